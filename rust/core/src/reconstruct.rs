//! Rebuilding LoRA matrices from the trainable vector `theta_d`.
//!
//! The matrices are the consecutive slices of `theta_D = P theta_d` in the given order
//! (the adapter's flattening order: per module `B` then `A`, each row-major).

use rayon::prelude::*;

use crate::error::{CoreError, Result};
use crate::parallel;
use crate::projection::Projection;

/// Rows per parallel work item.
const CHUNK: usize = 1 << 16;

/// Validates `shapes` and returns `D`, the sum of `rows * cols`.
pub fn total_size(shapes: &[(u64, u64)]) -> Result<u64> {
    if shapes.is_empty() {
        return Err(CoreError::InvalidArgument(
            "shapes is empty: give at least one (rows, cols) matrix shape".into(),
        ));
    }
    let mut total: u64 = 0;
    for (k, &(rows, cols)) in shapes.iter().enumerate() {
        if rows == 0 || cols == 0 {
            return Err(CoreError::InvalidArgument(format!(
                "shape #{k} is ({rows}, {cols}): every dimension must be at least 1"
            )));
        }
        let size = rows.checked_mul(cols).and_then(|s| total.checked_add(s));
        total = size.ok_or_else(|| {
            CoreError::InvalidArgument(format!(
                "shape #{k} ({rows}, {cols}) overflows the total size"
            ))
        })?;
    }
    Ok(total)
}

/// Checks that `vector` has length `d` and holds only finite values.
pub fn check_vector(vector: &[f32], d: u64) -> Result<()> {
    if vector.len() as u64 != d {
        return Err(CoreError::Vector(format!(
            "vector has length {} but d = {d}: theta_d must have exactly d elements",
            vector.len()
        )));
    }
    if let Some(pos) = vector.iter().position(|v| !v.is_finite()) {
        return Err(CoreError::Vector(format!(
            "vector[{pos}] = {} is not finite: theta_d must not hold NaN or Inf",
            vector[pos]
        )));
    }
    Ok(())
}

/// Fills `outs` (one buffer per shape, in order) with the reconstructed matrices.
///
/// `outs[k].len()` must equal `rows_k * cols_k`. Runs in the crate's thread pool; the
/// result is identical for every thread count.
pub fn reconstruct_into(
    vector: &[f32],
    seed: u64,
    shapes: &[(u64, u64)],
    outs: &mut [&mut [f32]],
) -> Result<()> {
    let total = total_size(shapes)?;
    let proj = Projection::new(seed, total, vector.len() as u64)?;
    check_vector(vector, proj.d())?;
    if outs.len() != shapes.len() {
        return Err(CoreError::InvalidArgument(format!(
            "{} output buffers for {} shapes",
            outs.len(),
            shapes.len()
        )));
    }
    let mut work: Vec<(u64, &mut [f32])> = Vec::new();
    let mut offset = 0u64;
    for (k, (out, &(rows, cols))) in outs.iter_mut().zip(shapes).enumerate() {
        let size = rows * cols;
        if out.len() as u64 != size {
            return Err(CoreError::InvalidArgument(format!(
                "output buffer #{k} has {} elements, shape ({rows}, {cols}) needs {size}",
                out.len()
            )));
        }
        for (c, chunk) in out.chunks_mut(CHUNK).enumerate() {
            work.push((offset + (c * CHUNK) as u64, chunk));
        }
        offset += size;
    }
    parallel::install(|| {
        work.par_iter_mut()
            .for_each(|(start, chunk)| proj.gather_into(vector, *start, chunk));
    });
    Ok(())
}

/// Reconstructs every matrix of `shapes` from `vector` (`theta_d`, length `d`).
pub fn reconstruct(vector: &[f32], seed: u64, shapes: &[(u64, u64)]) -> Result<Vec<Vec<f32>>> {
    total_size(shapes)?;
    let mut outs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(r, c)| CoreError::try_zeroed(r * c, "the reconstructed matrices"))
        .collect::<Result<_>>()?;
    {
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        reconstruct_into(vector, seed, shapes, &mut views)?;
    }
    Ok(outs)
}

/// Columns per parallel work item of the backward pass.
const COLUMN_CHUNK: usize = 1 << 12;

/// The backward pass of [`reconstruct`]: `grad_theta_d = P^T grad_theta_D`.
///
/// `grad` is the gradient of the flattened `theta_D` (length `D`); the result has length
/// `d`. Column `j` sums `grad[perm^-1(j + t d)]` for `t = 0, 1, ...` in that order in
/// float32, then multiplies by its scale once: no atomics, the same bits for every
/// thread count (and the same order as the GPU kernel).
pub fn reconstruct_backward(grad: &[f32], seed: u64, d: u64) -> Result<Vec<f32>> {
    let total = grad.len() as u64;
    let proj = Projection::new(seed, total, d)?;
    let mut out = CoreError::try_zeroed(d, "the gradient of theta_d")?;
    parallel::install(|| {
        out.par_chunks_mut(COLUMN_CHUNK)
            .enumerate()
            .for_each(|(c, acc)| {
                let j0 = (c * COLUMN_CHUNK) as u64;
                crate::kernel::accumulate_columns(&proj, grad, j0, acc);
                for (k, a) in acc.iter_mut().enumerate() {
                    *a *= proj.column_scale(j0 + k as u64);
                }
            });
    });
    Ok(out)
}
