//! Q4_0 dequantisation for the QLoRA forward: the frozen 4-bit base becomes f32 weights once per
//! forward pass (see [`super::linear`]), so this runs as often as the base's matmul.
//!
//! candle's `QTensor::dequantize` does the same arithmetic one block at a time on one thread,
//! compiled for baseline x86-64. This version reads the same bytes (GGML's Q4_0 block: an f16
//! scale `d`, then 16 bytes of nibbles; value `j` of the block is `(low nibble of byte j) - 8`
//! times `d`, value `16 + j` the high nibble's), runs inside [`vmath::dispatch`] and splits
//! large tensors over the rayon pool. Each value is the same single product `q as f32 * d`, so
//! the result is bitwise candle's (`tests/kernels_isa.rs` compares).

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::vmath;

/// Values per Q4_0 block.
const BLOCK: usize = 32;
/// Bytes per Q4_0 block: the f16 scale and 16 bytes of nibbles.
const BLOCK_BYTES: usize = 2 + BLOCK / 2;
/// Blocks per task when the tensor is split over the rayon pool (64k values).
const BLOCKS_PER_TASK: usize = 2048;

/// `q` as an f32 tensor on `device`: the Q4_0 kernel below for Q4_0 tensors on the CPU, candle's
/// own dequantisation for any other type or device.
pub fn dequantize(q: &QTensor, device: &Device) -> Result<Tensor> {
    if q.dtype() != GgmlDType::Q4_0 || !device.is_cpu() || !q.device().is_cpu() {
        return q.dequantize(device);
    }
    let data: Cow<'_, [u8]> = q.data()?;
    let n = q.shape().elem_count();
    if data.len() != n / BLOCK * BLOCK_BYTES || n % BLOCK != 0 {
        candle_core::bail!(
            "q4_0: {} bytes for {n} values ({} expected)",
            data.len(),
            n / BLOCK * BLOCK_BYTES
        );
    }
    let mut out = vec![0f32; n];
    dequantize_q4_0(&data, &mut out);
    Tensor::from_vec(out, q.shape(), device)
}

/// Q4_0 blocks `bytes` into `out` (32 values per 18 bytes).
pub fn dequantize_q4_0(bytes: &[u8], out: &mut [f32]) {
    let task = |(b, o): (&[u8], &mut [f32])| {
        vmath::dispatch(
            #[inline(always)]
            || {
                for (blk, ys) in b.chunks_exact(BLOCK_BYTES).zip(o.chunks_exact_mut(BLOCK)) {
                    block(blk, ys);
                }
            },
        )
    };
    let (bytes_per_task, values_per_task) =
        (BLOCKS_PER_TASK * BLOCK_BYTES, BLOCKS_PER_TASK * BLOCK);
    if out.len() > values_per_task && candle_core::utils::get_num_threads() > 1 {
        bytes
            .par_chunks(bytes_per_task)
            .zip(out.par_chunks_mut(values_per_task))
            .for_each(task);
    } else {
        bytes
            .chunks(bytes_per_task)
            .zip(out.chunks_mut(values_per_task))
            .for_each(task);
    }
}

/// One block: `ys[j] = (lo(qs[j]) - 8) d`, `ys[16 + j] = (hi(qs[j]) - 8) d`.
#[inline(always)]
fn block(blk: &[u8], ys: &mut [f32]) {
    let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let (lo, hi) = ys.split_at_mut(BLOCK / 2);
    for ((&q, l), h) in blk[2..BLOCK_BYTES].iter().zip(lo).zip(hi) {
        *l = f32::from((q & 0x0f) as i8 - 8) * d;
        *h = f32::from((q >> 4) as i8 - 8) * d;
    }
}
