//! The sizes every projection checks: `D` and `d` (`1 <= d <= D`, `d <= 2^32`), the
//! matrix shapes that make up `theta_D`, the vector `theta_d`, and the output buffers,
//! with the cutting of those buffers into parallel work items.

use crate::error::{CoreError, Result};

/// Checks the sizes of a projection of `total` rows (`D`) onto `d` columns:
/// `1 <= d <= D` and `d <= 2^32`.
pub fn check_dims(total: u64, d: u64) -> Result<()> {
    if d == 0 {
        return Err(CoreError::InvalidArgument(
            "d (the trainable vector length) must be at least 1, got 0".into(),
        ));
    }
    if total == 0 {
        return Err(CoreError::InvalidArgument(
            "the total size D of all reconstructed matrices must be at least 1, got 0".into(),
        ));
    }
    if d > total {
        return Err(CoreError::InvalidArgument(format!(
            "d = {d} is larger than the total size D = {total} of the reconstructed \
             matrices; d must satisfy 1 <= d <= D"
        )));
    }
    if d > u64::from(u32::MAX) + 1 {
        return Err(CoreError::InvalidArgument(format!(
            "d = {d} exceeds the limit of 2^32 columns"
        )));
    }
    Ok(())
}

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

/// Checks that there is one output buffer per shape, of the shape's size.
pub(crate) fn check_outputs(shapes: &[(u64, u64)], outs: &[&mut [f32]]) -> Result<()> {
    if outs.len() != shapes.len() {
        return Err(CoreError::InvalidArgument(format!(
            "{} output buffers for {} shapes",
            outs.len(),
            shapes.len()
        )));
    }
    for (k, (out, &(rows, cols))) in outs.iter().zip(shapes).enumerate() {
        let size = rows * cols;
        if out.len() as u64 != size {
            return Err(CoreError::InvalidArgument(format!(
                "output buffer #{k} has {} elements, shape ({rows}, {cols}) needs {size}",
                out.len()
            )));
        }
    }
    Ok(())
}

/// Cuts consecutive output buffers (together rows `0, 1, ...` of `theta_D`, in order)
/// into pieces that never cross a multiple of `rows`; each comes with its first row.
pub(crate) fn cut_pieces<'a>(outs: &'a mut [&mut [f32]], rows: u64) -> Vec<(u64, &'a mut [f32])> {
    let mut pieces = Vec::new();
    let mut row = 0u64;
    for out in outs.iter_mut() {
        let mut rest: &mut [f32] = out;
        while !rest.is_empty() {
            let room = (rows - row % rows).min(rest.len() as u64) as usize;
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(room);
            pieces.push((row, head));
            row += room as u64;
            rest = tail;
        }
    }
    pieces
}

/// One zeroed float32 buffer per shape (checked by [`total_size`] first).
pub(crate) fn zeroed_outputs(shapes: &[(u64, u64)]) -> Result<Vec<Vec<f32>>> {
    total_size(shapes)?;
    shapes
        .iter()
        .map(|&(r, c)| CoreError::try_zeroed(r * c, "the reconstructed matrices"))
        .collect()
}
