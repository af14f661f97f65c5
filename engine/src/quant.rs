//! GGML tensor types and their dequantization to f32 (block layouts of llama.cpp's ggml).

use half::{bf16, f16};
use rayon::prelude::*;

/// The tensor types moera reads from GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The kernels' format for blocks they consume as stored, or `None` (dequantized).
    pub fn kept_quantized(self) -> Option<moera_kernels::QuantFormat> {
        use moera_kernels::QuantFormat;
        match self {
            Self::Q4_0 => Some(QuantFormat::Q4_0),
            Self::Q4_1 => Some(QuantFormat::Q4_1),
            Self::Q8_0 => Some(QuantFormat::Q8_0),
            Self::Q4K => Some(QuantFormat::Q4K),
            _ => None,
        }
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Bytes taken by `elements` values, or `None` if they do not fill whole blocks.
    pub fn byte_size(self, elements: u64) -> Option<u64> {
        let (per_block, bytes) = self.block();
        elements
            .is_multiple_of(per_block as u64)
            .then(|| (elements / per_block as u64).checked_mul(bytes as u64))
            .flatten()
    }

    /// Dequantizes whole blocks of `data` (its length must be a multiple of the block size).
    pub fn dequantize(self, data: &[u8]) -> Vec<f32> {
        let (per_block, bytes) = self.block();
        let blocks = data.len() / bytes;
        let mut out = vec![0f32; blocks * per_block];
        // Groups of blocks per task keep the rayon overhead small for tiny block types.
        let group = 64usize;
        out.par_chunks_mut(per_block * group)
            .zip(data.par_chunks(bytes * group))
            .for_each(|(out, data)| {
                for (y, block) in out
                    .chunks_exact_mut(per_block)
                    .zip(data.chunks_exact(bytes))
                {
                    self.dequantize_block(block, y);
                }
            });
        out
    }

    fn dequantize_block(self, b: &[u8], y: &mut [f32]) {
        match self {
            Self::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F16 => y[0] = f16_at(b, 0),
            Self::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Self::Q4_0 => {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            Self::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0f) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
            Self::Q8_0 => {
                let d = f16_at(b, 0);
                for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                    *y = q as i8 as f32 * d;
                }
            }
            Self::Q4K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (chunk, (y, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
                    let [(d1, m1), (d2, m2)] = k4_sub_block_scales(chunk, d, dmin, scales);
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
            Self::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let ql = &b[48..176];
                for (chunk, (y, q)) in y.chunks_exact_mut(64).zip(ql.chunks_exact(32)).enumerate() {
                    let [(d1, m1), (d2, m2)] = k4_sub_block_scales(chunk, d, dmin, scales);
                    let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
                    for l in 0..32 {
                        let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        y[l] = d1 * ((q[l] & 0x0f) + hi1) as f32 - m1;
                        y[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
                    }
                }
            }
            Self::Q6K => {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let y = &mut y[128 * n..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * sc[is + k] as i8 as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scale and min of the two 32-value sub-blocks of 64-value `chunk` (Q4_K/Q5_K).
fn k4_sub_block_scales(chunk: usize, d: f32, dmin: f32, scales: &[u8]) -> [(f32, f32); 2] {
    [2 * chunk, 2 * chunk + 1].map(|j| {
        let (scale, min) = scale_min_k4(j, scales);
        (d * scale as f32, dmin * min as f32)
    })
}

/// The 6-bit scale and min of sub-block `j` in the 12 packed scale bytes of Q4_K/Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
