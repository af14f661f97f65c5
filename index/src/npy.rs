//! Reading and writing 2-D `.npy` arrays of f32 (C or Fortran order) and of u64.

use std::path::Path;

use crate::IndexError;

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}':"))? + key.len() + 3;
    let rest = header[start..].trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find(',')?
    };
    Some(rest[..end].trim())
}

/// Reads a 2-D little-endian f32 `.npy` file into a row-major matrix.
pub fn read_f32_matrix(path: &Path) -> Result<Matrix, IndexError> {
    let fail = |reason: String| IndexError::Npy {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(fail("not a .npy file".into()));
    }
    let (header_len, offset) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(fail(format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(offset..offset + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| fail("truncated header".into()))?;
    if header_value(header, "descr") != Some("'<f4'") {
        return Err(fail(format!(
            "expected little-endian f32 data, header {header}"
        )));
    }
    let fortran = header_value(header, "fortran_order") == Some("True");
    let shape: Vec<usize> = header_value(header, "shape")
        .map(|s| s.trim_matches(|c| c == '(' || c == ')'))
        .map(|s| {
            s.split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.trim().parse())
                .collect()
        })
        .transpose()
        .map_err(|e| fail(format!("bad shape: {e}")))?
        .ok_or_else(|| fail("no shape in header".into()))?;
    let [rows, cols] = shape[..] else {
        return Err(fail(format!("expected a 2-D array, shape {shape:?}")));
    };
    let body = &bytes[offset + header_len..];
    if body.len() != rows * cols * 4 {
        return Err(fail(format!(
            "{} data bytes for shape ({rows}, {cols})",
            body.len()
        )));
    }
    let values: Vec<f32> = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let data = if fortran {
        let mut data = vec![0f32; values.len()];
        for c in 0..cols {
            for r in 0..rows {
                data[r * cols + c] = values[c * rows + r];
            }
        }
        data
    } else {
        values
    };
    Ok(Matrix { rows, cols, data })
}
