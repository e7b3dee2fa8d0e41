//! Rebuilding LoRA matrices from the trainable vector `theta_d` with the sparse map, in
//! parallel, and the deterministic backward pass of that map.
//!
//! The matrices are the consecutive slices of `theta_D = P theta_d` in the given order
//! (the adapter's flattening order: per module `B` then `A`, each row-major).

use rayon::prelude::*;

use super::kernel::{accumulate_columns, gather};
use super::shapes::{check_outputs, check_vector, cut_pieces, total_size, zeroed_outputs};
use super::sparse::Projection;
use crate::error::{CoreError, Result};
use crate::parallel;

/// Rows per parallel work item.
const CHUNK: usize = 1 << 16;

/// Reconstructions of at least this many rows (64 MiB) use streaming stores.
const STREAM_ROWS: u64 = 1 << 24;

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
    check_outputs(shapes, outs)?;
    let mut work = cut_pieces(outs, CHUNK as u64);
    // Outputs far larger than the caches are written with streaming stores.
    let stream = total >= STREAM_ROWS;
    parallel::install(|| {
        work.par_iter_mut()
            .for_each(|(start, chunk)| gather(&proj, vector, *start, chunk, stream));
    });
    Ok(())
}

/// Reconstructs every matrix of `shapes` from `vector` (`theta_d`, length `d`).
pub fn reconstruct(vector: &[f32], seed: u64, shapes: &[(u64, u64)]) -> Result<Vec<Vec<f32>>> {
    let mut outs = zeroed_outputs(shapes)?;
    {
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        reconstruct_into(vector, seed, shapes, &mut views)?;
    }
    Ok(outs)
}

/// Number of consecutive `t` values (images `j + t d` of a column) summed into one
/// partial sum by the backward pass; part of the spec (docs/SPEC.md, section 1.4).
pub const BACKWARD_T_CHUNK: u64 = 64;

/// Columns per block of the CPU backward pass.
const COLUMN_BLOCK: u64 = 1 << 12;

/// Aim for work items of about this many gradient rows.
const ITEM_ROWS: u64 = 1 << 16;

/// The backward pass of [`reconstruct`]: `grad_theta_d = P^T grad_theta_D`.
///
/// `grad` is the gradient of the flattened `theta_D` (length `D`); the result has length
/// `d`. The images of column `j` are `y = j + t d`, `t = 0, 1, ...`; they are cut into
/// chunks of [`BACKWARD_T_CHUNK`] consecutive `t`. Each chunk sums `grad[perm^-1(y)]`
/// in increasing `t` from `0.0` in float32; the chunk sums are added in chunk order
/// from `0.0`, and the total is multiplied by the column's scale once. No atomics, the
/// same bits for every thread count, and the same order as the GPU kernels, which give
/// each chunk to its own program.
pub fn reconstruct_backward(grad: &[f32], seed: u64, d: u64) -> Result<Vec<f32>> {
    let proj = Projection::new(seed, grad.len() as u64, d)?;
    let mut out = CoreError::try_zeroed(d, "the gradient of theta_d")?;
    let n_t = proj.total().div_ceil(d);
    let n_c = n_t.div_ceil(BACKWARD_T_CHUNK);
    let width = d.min(COLUMN_BLOCK) as usize;
    // The chunk sums, one region per block of `width` columns (the last may be
    // narrower): the block starting at column j0 owns part[j0 n_c .. (j0 + w) n_c],
    // whose row c (w values) holds chunk c. Every work item's slice is contiguous.
    let mut part: Vec<f32> =
        CoreError::try_zeroed(n_c.saturating_mul(d), "the chunk sums of the backward pass")?;
    let per_item = (ITEM_ROWS / (BACKWARD_T_CHUNK * width as u64)).max(1) as usize;
    let mut items: Vec<(u64, u64, &mut [f32])> = Vec::new();
    for (b, region) in part.chunks_mut(n_c as usize * width).enumerate() {
        let w = region.len() / n_c as usize;
        for (i, piece) in region.chunks_mut(per_item * w).enumerate() {
            items.push(((b * width) as u64, (i * per_item) as u64, piece));
        }
    }
    let proj = &proj;
    parallel::install(|| {
        items.into_par_iter().for_each(|(j0, c0, piece)| {
            let w = width.min((d - j0) as usize);
            for (k, acc) in piece.chunks_mut(w).enumerate() {
                let t0 = (c0 + k as u64) * BACKWARD_T_CHUNK;
                let t1 = (t0 + BACKWARD_T_CHUNK).min(n_t);
                accumulate_columns(proj, grad, t0..t1, j0, acc);
            }
        });
    });
    parallel::install(|| {
        out.par_chunks_mut(width)
            .zip(part.par_chunks(n_c as usize * width))
            .enumerate()
            .for_each(|(b, (o, region))| {
                let w = o.len();
                for (k, x) in o.iter_mut().enumerate() {
                    let acc = region
                        .iter()
                        .skip(k)
                        .step_by(w)
                        .fold(0f32, |acc, &p| acc + p);
                    *x = acc * proj.column_scale((b * width + k) as u64);
                }
            });
    });
    Ok(out)
}
