//! Learning-rate schedule: linear warmup, then cosine decay to a floor. A pure function of the step, so a
//! resumed run needs no schedule state.

use std::f64::consts::PI;

/// Learning rate of optimizer step `step` (0-based) out of `total`.
///
/// Warmup: `lr * (step + 1) / warmup` for `step < warmup` (the first step already moves the weights).
/// Then cosine from `lr` to `lr * min_ratio` over the remaining steps: with
/// `p = (step - warmup) / (total - warmup)`, `lr_t = floor + (lr - floor) * (1 + cos(pi p)) / 2`.
/// Steps at or past `total` stay at the floor.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let floor = lr * min_ratio;
    if step >= total {
        return floor;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = (step - warmup) as f64 / span;
    floor + (lr - floor) * 0.5 * (1.0 + (PI * p).cos())
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn warmup_is_linear_and_peaks_at_lr() {
        assert_eq!(lr_at(0, 100, 10, 1.0, 0.1), 0.1);
        assert_eq!(lr_at(4, 100, 10, 1.0, 0.1), 0.5);
        assert_eq!(lr_at(10, 100, 10, 1.0, 0.1), 1.0);
    }

    #[test]
    fn cosine_reaches_midpoint_and_floor() {
        // halfway through the decay the rate is the mean of peak and floor
        let mid = lr_at(55, 100, 10, 2.0, 0.1);
        assert!((mid - (2.0 + 0.2) / 2.0).abs() < 1e-12, "{mid}");
        assert_eq!(lr_at(100, 100, 10, 2.0, 0.1), 0.2);
        assert_eq!(lr_at(500, 100, 10, 2.0, 0.1), 0.2);
        // monotone after warmup
        let mut prev = f64::INFINITY;
        for s in 10..100 {
            let v = lr_at(s, 100, 10, 2.0, 0.1);
            assert!(v <= prev && v >= 0.2);
            prev = v;
        }
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        assert_eq!(lr_at(0, 10, 0, 3.0, 0.0), 3.0);
    }
}
