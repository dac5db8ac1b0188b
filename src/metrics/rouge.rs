//! ROUGE-L as pycocoevalcap 1.2's `rouge.py`: longest common subsequence with
//! each reference, precision and recall each maximised over references, then
//! the F-measure with β = 1.2. The corpus score is the mean over images.

const BETA: f64 = 1.2;

/// Length of the longest common subsequence, one DP row in `row`.
pub fn lcs(a: &[u32], b: &[u32], row: &mut Vec<u32>) -> u32 {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    row.clear();
    row.resize(short.len() + 1, 0);
    for &x in long {
        // `diag` holds the previous row's value at j-1
        let mut diag = 0;
        for (j, &y) in short.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[short.len()]
}

/// ROUGE-L of a candidate against its references (token ids as `split(" ")`
/// gives them, so never empty).
pub fn rouge_l<'r>(
    cand: &[u32],
    refs: impl IntoIterator<Item = &'r [u32]>,
    row: &mut Vec<u32>,
) -> f64 {
    let mut prec_max: f64 = 0.0;
    let mut rec_max: f64 = 0.0;
    for r in refs {
        let l = f64::from(lcs(r, cand, row));
        prec_max = prec_max.max(l / cand.len() as f64);
        rec_max = rec_max.max(l / r.len() as f64);
    }
    if prec_max != 0.0 && rec_max != 0.0 {
        let b2 = BETA.powi(2);
        ((1.0 + b2) * prec_max * rec_max) / (rec_max + b2 * prec_max)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcs_is_symmetric_and_correct() {
        let mut row = Vec::new();
        assert_eq!(lcs(&[1, 2, 3, 4, 5], &[2, 4, 5, 9], &mut row), 3);
        assert_eq!(lcs(&[2, 4, 5, 9], &[1, 2, 3, 4, 5], &mut row), 3);
        assert_eq!(lcs(&[], &[1], &mut row), 0);
    }

    #[test]
    fn identical_caption_scores_one() {
        let mut row = Vec::new();
        let c = [3u32, 1, 4];
        assert!((rouge_l(&c, [&c[..]], &mut row) - 1.0).abs() < 1e-12);
    }
}
