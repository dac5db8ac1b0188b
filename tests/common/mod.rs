//! Helpers shared by the integration tests (each test file includes this with `mod common;`).

use candle_core::Tensor;

/// Largest absolute element-wise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "tensors of different shapes");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
