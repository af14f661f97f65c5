//! Weight-only quantized matrices: the formats, their packing on the host and their
//! dequantization.
//!
//! Every format moera runs is one of two code widths with a scale per group of consecutive
//! weights along a row, and optionally an offset per group:
//!
//! ```text
//! weight[n, k] = scale[n, k / group] · code[n, k] + offset[n, k / group]
//! ```
//!
//! - 4-bit codes (unsigned 0..=15), eight to a `u32` word, weight `k` in bits `4·(k % 8)`:
//!   int4 symmetric (`offset = −8·scale`), int4 asymmetric (`offset = min`), GGUF Q4_0
//!   (`d·(q − 8)`), Q4_1 (`d·q + m`) and Q4_K (per 32-weight sub-block `d·sc·q − dmin·m`).
//! - 8-bit codes (signed −128..=127), four to a word: int8 per output channel (one group
//!   per row) and GGUF Q8_0 (`d·q`, groups of 32).
//!
//! GGUF blocks are re-laid out once at load (codes in one array, scales in another) but keep
//! their codes and their f16 scales exactly, so every weight dequantizes to the value ggml's
//! own dequantization gives; nothing is widened to f32 per weight in memory.

use half::f16;
use rayon::prelude::*;

use crate::KernelError;

/// Where a quantized matrix came from; decides how its codes and scales were derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit symmetric, one scale per output channel (row).
    Int8,
    /// 4-bit in groups of `group` weights, symmetric (`asymmetric == false`) or with a min.
    Int4 { group: usize, asymmetric: bool },
    /// GGUF blocks of 32: `d·(q − 8)`.
    Q4_0,
    /// GGUF blocks of 32: `d·q + m`.
    Q4_1,
    /// GGUF blocks of 32: `d·q`, 8-bit `q`.
    Q8_0,
    /// GGUF super-blocks of 256 with 6-bit sub-block scales and mins.
    Q4K,
}

impl QuantFormat {
    /// Whether weights carry a per-group offset.
    pub fn has_offsets(self) -> bool {
        !matches!(self, Self::Int8 | Self::Q8_0)
    }

    /// Bits per code.
    pub fn code_bits(self) -> u32 {
        match self {
            Self::Int8 | Self::Q8_0 => 8,
            _ => 4,
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int8 => write!(f, "int8"),
            Self::Int4 { group, asymmetric } => {
                write!(f, "int4-g{group}{}", if *asymmetric { "-asym" } else { "" })
            }
            Self::Q4_0 => write!(f, "Q4_0"),
            Self::Q4_1 => write!(f, "Q4_1"),
            Self::Q8_0 => write!(f, "Q8_0"),
            Self::Q4K => write!(f, "Q4_K"),
        }
    }
}

/// A `[rows, cols]` weight matrix (HF layout: `rows` outputs, `cols` inputs) held as codes,
/// per-group scales and optional per-group offsets.
#[derive(Clone, PartialEq)]
pub struct QuantizedMatrix {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// Consecutive weights of a row sharing one scale (and offset).
    pub group: usize,
    /// Row-major packed codes: `cols / codes_per_word` words per row.
    pub codes: Vec<u32>,
    /// `[rows, cols / group]`.
    pub scales: Vec<f32>,
    /// `[rows, cols / group]`, or `None` when every offset is zero.
    pub offsets: Option<Vec<f32>>,
}

impl std::fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// GGUF block sizes (weights per block, bytes per block) of the formats kept quantized.
fn ggml_block(format: QuantFormat) -> Option<(usize, usize)> {
    match format {
        QuantFormat::Q4_0 => Some((32, 18)),
        QuantFormat::Q4_1 => Some((32, 20)),
        QuantFormat::Q8_0 => Some((32, 34)),
        QuantFormat::Q4K => Some((256, 144)),
        _ => None,
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl QuantizedMatrix {
    /// Codes packed in one `u32` word.
    pub fn codes_per_word(&self) -> usize {
        32 / self.format.code_bits() as usize
    }

    /// Words of codes per row.
    pub fn words_per_row(&self) -> usize {
        self.cols / self.codes_per_word()
    }

    /// Groups (scales) per row.
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    /// Bytes the codes, scales and offsets take.
    pub fn memory_bytes(&self) -> usize {
        4 * (self.codes.len() + self.scales.len() + self.offsets.as_ref().map_or(0, Vec::len))
    }

    /// Zeroed codes, scales and offsets; [`Self::finish`] drops the offsets of formats
    /// without any.
    fn empty(format: QuantFormat, rows: usize, cols: usize, group: usize) -> Self {
        let bits = format.code_bits() as usize;
        let groups = rows * (cols / group);
        Self {
            format,
            rows,
            cols,
            group,
            codes: vec![0; rows * cols * bits / 32],
            scales: vec![0.0; groups],
            offsets: Some(vec![0.0; groups]),
        }
    }

    fn finish(mut self) -> Self {
        if !self.format.has_offsets() {
            self.offsets = None;
        }
        self
    }

    /// Codes, scales and offsets of each row, for filling them in parallel.
    fn rows_mut(
        &mut self,
    ) -> impl IndexedParallelIterator<Item = (&mut [u32], &mut [f32], &mut [f32])> {
        let (words, groups) = (self.words_per_row(), self.groups_per_row());
        let offsets = self.offsets.as_mut().expect("set by empty()");
        self.codes
            .par_chunks_mut(words)
            .zip(self.scales.par_chunks_mut(groups))
            .zip(offsets.par_chunks_mut(groups))
            .map(|((c, s), o)| (c, s, o))
    }

    /// Re-lays out a GGUF tensor of `rows × cols` weights stored as `format` blocks along
    /// each row (ggml's `ne0 = cols`).
    pub fn from_ggml(
        format: QuantFormat,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        let (per_block, block_bytes) =
            ggml_block(format).ok_or(KernelError::NotAGgmlFormat(format))?;
        if cols == 0 || !cols.is_multiple_of(per_block) {
            return Err(KernelError::Shape(format!(
                "{format} rows of {cols} weights do not fill blocks of {per_block}"
            )));
        }
        let expected = rows * cols / per_block * block_bytes;
        if bytes.len() != expected {
            return Err(KernelError::Shape(format!(
                "{format} tensor [{rows}, {cols}] needs {expected} bytes, found {}",
                bytes.len()
            )));
        }
        let mut out = Self::empty(format, rows, cols, 32);
        let row_bytes = cols / per_block * block_bytes;
        out.rows_mut().zip(bytes.par_chunks(row_bytes)).for_each(
            |((codes, scales, offsets), row)| {
                let blocks = row.chunks_exact(block_bytes);
                match format {
                    QuantFormat::Q8_0 => {
                        for ((b, words), scale) in
                            blocks.zip(codes.chunks_exact_mut(8)).zip(scales.iter_mut())
                        {
                            *scale = f16_at(b, 0);
                            pack8(&b[2..34], words);
                        }
                    }
                    QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                        for (((b, words), scale), offset) in blocks
                            .zip(codes.chunks_exact_mut(4))
                            .zip(scales.iter_mut())
                            .zip(offsets.iter_mut())
                        {
                            let d = f16_at(b, 0);
                            let (qs, min) = if format == QuantFormat::Q4_0 {
                                (&b[2..18], -8.0 * d)
                            } else {
                                (&b[4..20], f16_at(b, 2))
                            };
                            *scale = d;
                            *offset = min;
                            // ggml stores weight j in the low nibble and j + 16 in the high one.
                            let mut nibbles = [0u8; 32];
                            for j in 0..16 {
                                nibbles[j] = qs[j] & 0x0f;
                                nibbles[j + 16] = qs[j] >> 4;
                            }
                            pack4(&nibbles, words);
                        }
                    }
                    QuantFormat::Q4K => {
                        for (((b, words), scales), offsets) in blocks
                            .zip(codes.chunks_exact_mut(32))
                            .zip(scales.chunks_exact_mut(8))
                            .zip(offsets.chunks_exact_mut(8))
                        {
                            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                            let sub_scales = &b[4..16];
                            let qs = &b[16..144];
                            for (chunk, q) in qs.chunks_exact(32).enumerate() {
                                let [(d1, m1), (d2, m2)] = k4_scales(chunk, d, dmin, sub_scales);
                                let mut low = [0u8; 32];
                                let mut high = [0u8; 32];
                                for l in 0..32 {
                                    low[l] = q[l] & 0x0f;
                                    high[l] = q[l] >> 4;
                                }
                                pack4(&low, &mut words[chunk * 8..chunk * 8 + 4]);
                                pack4(&high, &mut words[chunk * 8 + 4..chunk * 8 + 8]);
                                scales[2 * chunk] = d1;
                                scales[2 * chunk + 1] = d2;
                                offsets[2 * chunk] = -m1;
                                offsets[2 * chunk + 1] = -m2;
                            }
                        }
                    }
                    _ => unreachable!("checked by ggml_block"),
                }
            },
        );
        Ok(out.finish())
    }

    /// Quantizes `values` (`[rows, cols]`, row-major) to `format` (`Int8` or `Int4`): the
    /// in-situ quantization of a model loaded from float weights.
    pub fn quantize(
        format: QuantFormat,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if values.len() != rows * cols {
            return Err(KernelError::Shape(format!(
                "{} values for a [{rows}, {cols}] matrix",
                values.len()
            )));
        }
        let (group, asymmetric) = match format {
            QuantFormat::Int8 => (cols, false),
            QuantFormat::Int4 { group, asymmetric } => (group, asymmetric),
            other => return Err(KernelError::NotAnInSituFormat(other)),
        };
        let per_word = 32 / format.code_bits() as usize;
        if group == 0 || !cols.is_multiple_of(group) || !group.is_multiple_of(per_word) {
            return Err(KernelError::Shape(format!(
                "{format}: rows of {cols} weights do not split into groups of {group}"
            )));
        }
        let mut out = Self::empty(format, rows, cols, group);
        let words_per_group = group / per_word;
        let offsets = out.offsets.as_mut().expect("set by empty()");
        out.codes
            .par_chunks_mut(words_per_group)
            .zip(out.scales.par_iter_mut())
            .zip(offsets.par_iter_mut())
            .zip(values.par_chunks(group))
            .for_each(|(((words, scale), offset), weights)| {
                if format == QuantFormat::Int8 {
                    let max = weights.iter().fold(0f32, |m, w| m.max(w.abs()));
                    *scale = max / 127.0;
                    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                    let q: Vec<u8> = weights
                        .iter()
                        .map(|w| (w * inv).round().clamp(-127.0, 127.0) as i8 as u8)
                        .collect();
                    pack8(&q, words);
                } else if asymmetric {
                    let min = weights.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let s = (max - min) / 15.0;
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    let q: Vec<u8> = weights
                        .iter()
                        .map(|w| ((w - min) * inv).round().clamp(0.0, 15.0) as u8)
                        .collect();
                    *scale = s;
                    *offset = min;
                    pack4(&q, words);
                } else {
                    // Symmetric as ggml's Q4_0: the largest magnitude maps to −8, so its sign
                    // keeps the full range.
                    let extreme = weights
                        .iter()
                        .copied()
                        .fold(0f32, |e, w| if w.abs() > e.abs() { w } else { e });
                    let s = extreme / -8.0;
                    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
                    let q: Vec<u8> = weights
                        .iter()
                        .map(|w| (w * inv + 8.0).round().clamp(0.0, 15.0) as u8)
                        .collect();
                    *scale = s;
                    *offset = -8.0 * s;
                    pack4(&q, words);
                }
            });
        Ok(out.finish())
    }

    /// Every weight as f32, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0..self.rows)
    }

    /// Rows `rows` as f32, row-major `[rows.len(), cols]`.
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(row, out)| self.dequantize_row(rows.start + row, out));
        out
    }

    /// Row `row` as f32 into `out` (`cols` values), a group at a time.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let (groups, per_word, bits) = (
            self.groups_per_row(),
            self.codes_per_word(),
            self.format.code_bits(),
        );
        let words = &self.codes[row * self.words_per_row()..(row + 1) * self.words_per_row()];
        let words_per_group = self.group / per_word;
        for (g, (out, words)) in out
            .chunks_exact_mut(self.group)
            .zip(words.chunks_exact(words_per_group))
            .enumerate()
        {
            let scale = self.scales[row * groups + g];
            let offset = self.offsets.as_ref().map_or(0.0, |o| o[row * groups + g]);
            for (out, &word) in out.chunks_exact_mut(per_word).zip(words) {
                for (i, y) in out.iter_mut().enumerate() {
                    let field = (word >> (bits * i as u32)) & ((1 << bits) - 1);
                    let code = if bits == 8 {
                        field as u8 as i8 as f32
                    } else {
                        field as f32
                    };
                    *y = scale * code + offset;
                }
            }
        }
    }

    /// The rows of `parts` one after the other: one matrix of their formats, widths and
    /// groups, or [`KernelError::Shape`] when they differ (or there are none).
    pub fn stack_rows(parts: &[&Self]) -> Result<Self, KernelError> {
        let first = parts
            .first()
            .ok_or_else(|| KernelError::Shape("no matrices to stack".into()))?;
        if let Some(odd) = parts.iter().find(|p| {
            (p.format, p.cols, p.group) != (first.format, first.cols, first.group)
                || p.offsets.is_some() != first.offsets.is_some()
        }) {
            return Err(KernelError::Shape(format!(
                "cannot stack {} [{}, {}] (group {}) under {} [{}, {}] (group {})",
                odd.format,
                odd.rows,
                odd.cols,
                odd.group,
                first.format,
                first.rows,
                first.cols,
                first.group
            )));
        }
        Ok(Self {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            group: first.group,
            codes: parts.iter().flat_map(|p| &p.codes).copied().collect(),
            scales: parts.iter().flat_map(|p| &p.scales).copied().collect(),
            offsets: first.offsets.as_ref().map(|_| {
                parts
                    .iter()
                    .flat_map(|p| p.offsets.iter().flatten())
                    .copied()
                    .collect()
            }),
        })
    }

    /// The matrix with its rows reordered: output row `i` is input row `order[i]`.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        fn gather<T: Copy>(values: &[T], width: usize, order: &[usize]) -> Vec<T> {
            order
                .iter()
                .flat_map(|&r| &values[r * width..(r + 1) * width])
                .copied()
                .collect()
        }
        let groups = self.groups_per_row();
        Self {
            codes: gather(&self.codes, self.words_per_row(), order),
            scales: gather(&self.scales, groups, order),
            offsets: self.offsets.as_ref().map(|o| gather(o, groups, order)),
            ..self.clone()
        }
    }
}

/// Packs 4-bit codes (values 0..=15), eight to a word, code `i` in bits `4·(i % 8)`.
fn pack4(codes: &[u8], words: &mut [u32]) {
    for (word, chunk) in words.iter_mut().zip(codes.chunks_exact(8)) {
        *word = chunk
            .iter()
            .enumerate()
            .fold(0, |w, (i, &c)| w | (u32::from(c & 0x0f) << (4 * i)));
    }
}

/// Packs 8-bit codes (two's complement bytes), four to a word, code `i` in bits `8·(i % 4)`.
fn pack8(codes: &[u8], words: &mut [u32]) {
    for (word, chunk) in words.iter_mut().zip(codes.chunks_exact(4)) {
        *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

/// Q4_K's two (scale, min) pairs of 64-weight chunk `chunk`, as ggml's `get_scale_min_k4`.
fn k4_scales(chunk: usize, d: f32, dmin: f32, scales: &[u8]) -> [(f32, f32); 2] {
    let scale_min = |j: usize| -> (u8, u8) {
        if j < 4 {
            (scales[j] & 63, scales[j + 4] & 63)
        } else {
            (
                (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
                (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
            )
        }
    };
    let (s1, m1) = scale_min(2 * chunk);
    let (s2, m2) = scale_min(2 * chunk + 1);
    [
        (d * s1 as f32, dmin * m1 as f32),
        (d * s2 as f32, dmin * m2 as f32),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn int8_round_trip_error_is_within_half_a_step() {
        let (rows, cols) = (5, 64);
        let w = lcg(1, rows * cols);
        let q = QuantizedMatrix::quantize(QuantFormat::Int8, &w, rows, cols).unwrap();
        let back = q.dequantize();
        for r in 0..rows {
            let step = q.scales[r];
            for c in 0..cols {
                let i = r * cols + c;
                assert!((w[i] - back[i]).abs() <= 0.5 * step + 1e-6);
            }
        }
    }

    #[test]
    fn int4_round_trip_error_is_within_half_a_step() {
        for asymmetric in [false, true] {
            let (rows, cols, group) = (3, 128, 32);
            let w = lcg(2, rows * cols);
            let format = QuantFormat::Int4 { group, asymmetric };
            let q = QuantizedMatrix::quantize(format, &w, rows, cols).unwrap();
            let back = q.dequantize();
            // Symmetric groups map their largest magnitude to −8, so the other side reaches
            // only +7 steps: up to one step of error there.
            let bound = if asymmetric { 0.5 } else { 1.0 };
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let step = q.scales[i / group].abs();
                assert!(
                    (a - b).abs() <= bound * step + 1e-6,
                    "{format} at {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QuantizedMatrix::quantize(QuantFormat::Int8, &[0.0; 6], 2, 4).is_err());
        let format = QuantFormat::Int4 {
            group: 32,
            asymmetric: false,
        };
        assert!(QuantizedMatrix::quantize(format, &[0.0; 48], 1, 48).is_err());
        assert!(QuantizedMatrix::from_ggml(QuantFormat::Q4_0, &[0; 17], 1, 32).is_err());
        assert!(QuantizedMatrix::from_ggml(QuantFormat::Int8, &[0; 17], 1, 32).is_err());
        assert!(QuantizedMatrix::from_ggml(QuantFormat::Q8_0, &[], 1, 0).is_err());
    }
}
