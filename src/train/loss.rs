//! Losses the training stages share, built only from differentiable candle ops.
