//! Reading and writing 2-D `.npy` arrays: f32 vectors in (C or Fortran order), and i64 or
//! u64 ids.

use std::path::Path;

use crate::IndexError;

/// A row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<T = f32> {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<T>,
}

impl<T> Matrix<T> {
    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// An element type `.npy` files can hold here.
pub trait Element: bytemuck::Pod {
    /// numpy's `descr` of the little-endian type.
    const DESCR: &'static str;
}

impl Element for f32 {
    const DESCR: &'static str = "<f4";
}

impl Element for i64 {
    const DESCR: &'static str = "<i8";
}

impl Element for u64 {
    const DESCR: &'static str = "<u8";
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

fn npy_error(path: &Path) -> impl Fn(String) -> IndexError + '_ {
    move |reason| IndexError::Npy {
        path: path.to_path_buf(),
        reason,
    }
}

/// Reads a 2-D little-endian f32 `.npy` file into a row-major matrix.
pub fn read_f32_matrix(path: &Path) -> Result<Matrix, IndexError> {
    read_matrix(path)
}

/// Reads a 2-D `.npy` file of element type `T` into a row-major matrix.
pub fn read_matrix<T: Element>(path: &Path) -> Result<Matrix<T>, IndexError> {
    let fail = npy_error(path);
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
    if header_value(header, "descr") != Some(&format!("'{}'", T::DESCR)) {
        return Err(fail(format!("expected {} data, header {header}", T::DESCR)));
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
    let expected = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(size_of::<T>()));
    if Some(body.len()) != expected {
        return Err(fail(format!(
            "{} data bytes for shape ({rows}, {cols})",
            body.len()
        )));
    }
    let values: Vec<T> = bytemuck::pod_collect_to_vec(body);
    let data = if fortran {
        let mut data = values.clone();
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

/// Writes a row-major matrix as a version-1 `.npy` file.
pub fn write_matrix<T: Element>(path: &Path, matrix: &Matrix<T>) -> Result<(), IndexError> {
    let fail = npy_error(path);
    if matrix.data.len() != matrix.rows * matrix.cols {
        return Err(fail("the data does not fill the shape".into()));
    }
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({}, {}), }}",
        T::DESCR,
        matrix.rows,
        matrix.cols
    );
    // The data starts on a 64-byte boundary; the header ends with a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(bytemuck::cast_slice::<T, u8>(&matrix.data));
    std::fs::write(path, bytes).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_types_are_checked() {
        let path = std::env::temp_dir().join(format!("moera-npy-{}.npy", std::process::id()));
        let ids = Matrix {
            rows: 2,
            cols: 3,
            data: vec![1i64, 2, 3, 4, 5, -6],
        };
        write_matrix(&path, &ids).unwrap();
        assert_eq!(read_matrix::<i64>(&path).unwrap(), ids);
        assert!(matches!(
            read_f32_matrix(&path),
            Err(IndexError::Npy { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
