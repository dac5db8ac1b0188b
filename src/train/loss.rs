//! Losses the training stages share, built only from differentiable candle ops (the fused softmax has
//! no backward in candle 0.11, so it must not appear here).

use candle_core::{DType, Result, Tensor, D};

/// Token cross-entropy with label smoothing, as `torch.nn.CrossEntropyLoss(label_smoothing=eps)` defines
/// it: the target distribution is `(1 - eps) * onehot(y) + eps / V`, so
/// `loss_i = (1 - eps) * (-log p_i[y_i]) + eps * mean_v(-log p_i[v])`.
///
/// `logits` is `[N, V]` or `[B, T, V]` (flattened to `[B*T, V]`), `targets` the matching `[N]` or `[B, T]`
/// token ids (u32). `mask` (same shape as `targets`, 1 for real tokens, 0 for padding) selects the
/// positions averaged over; without it every position counts. An all-zero mask gives 0.
pub fn smoothed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    smoothing: f64,
) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let n = logits.dim(0)?;
    let targets = targets.reshape((n, 1))?.to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = logp.gather(&targets, 1)?.squeeze(1)?.neg()?;
    let per = if smoothing > 0.0 {
        let uniform = logp.mean(D::Minus1)?.neg()?;
        ((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?
    } else {
        nll
    };
    match mask {
        None => per.mean_all(),
        Some(m) => {
            let m = m.reshape(n)?.to_dtype(per.dtype())?;
            let count = m.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            (per * m)?.sum_all()? / count.max(1.0)
        }
    }
}
