//! Small statistics for the report: mean ± 95% confidence interval over seeds
//! (Student's t, since a sweep rarely has more than a handful of seeds).

/// Two-sided 97.5% quantiles of Student's t for 1..=30 degrees of freedom.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// The 97.5% quantile of Student's t with `df` degrees of freedom (df ≥ 1).
pub fn t975(df: usize) -> f64 {
    match df {
        0 => f64::NAN,
        1..=30 => T975[df - 1],
        // beyond the table the normal approximation with a 1/df correction is
        // accurate to 3 decimals
        _ => 1.959_964 + 2.4 / df as f64,
    }
}

/// A mean with the half-width of its 95% interval (None for one value).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub half: Option<f64>,
    pub n: usize,
}

impl Stat {
    /// Mean and t-interval of the finite values; None when there are none.
    pub fn of(values: &[f64]) -> Option<Stat> {
        let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let half = (n > 1).then(|| {
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            t975(n - 1) * (var / n as f64).sqrt()
        });
        Some(Stat { mean, half, n })
    }

    /// `12.34` or `12.34 ± 0.56`, after multiplying by `scale`.
    pub fn show(&self, scale: f64, decimals: usize) -> String {
        match self.half {
            Some(h) => format!(
                "{:.*} ± {:.*}",
                decimals,
                self.mean * scale,
                decimals,
                h * scale
            ),
            None => format!("{:.*}", decimals, self.mean * scale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_matches_scipy() {
        // scipy.stats.t.interval(0.95, 2, loc=mean, scale=sem) for [1, 2, 4]:
        // mean 7/3, sem 0.8819171, half-width 3.794566
        let s = Stat::of(&[1.0, 2.0, 4.0]).unwrap();
        assert!((s.mean - 7.0 / 3.0).abs() < 1e-12);
        assert!((s.half.unwrap() - 3.794_566).abs() < 1e-3);
        assert_eq!(Stat::of(&[3.0]).unwrap().half, None);
        assert!(Stat::of(&[f64::NAN]).is_none());
    }
}
