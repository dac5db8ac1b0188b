//! ROUGE-L as pycocoevalcap 1.2's `rouge.py`: longest common subsequence with
//! each reference, precision and recall each maximised over references, then
//! the F-measure with β = 1.2. The corpus score is the mean over images.
//!
//! A candidate of at most 64 tokens (every MUGE caption) is matched against its references
//! bit-parallel: one 64-bit word holds a row of the LCS table, and each reference token
//! updates it with an add and three logic operations (Hyyrö's formulation of the Allison-Dix
//! bit-vector LCS), instead of one comparison per cell. Longer candidates take the plain
//! one-row dynamic programme. Both give the same integer, so scores do not change.

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

/// For each distinct token of a pattern of at most 64 tokens, the bits of the positions that
/// hold it, sorted by token.
fn match_masks(pattern: &[u32], masks: &mut Vec<(u32, u64)>) {
    masks.clear();
    masks.extend(pattern.iter().enumerate().map(|(j, &t)| (t, 1u64 << j)));
    masks.sort_unstable_by_key(|&(t, _)| t);
    masks.dedup_by(|next, kept| {
        let same = next.0 == kept.0;
        if same {
            kept.1 |= next.1;
        }
        same
    });
}

/// LCS length of `text` and a pattern of `m` <= 64 tokens given by its [`match_masks`].
fn lcs_bits(masks: &[(u32, u64)], m: usize, text: &[u32]) -> u32 {
    // zero bits of `v` (low `m`) count the LCS; bits above `m` only ever receive carries
    let mut v = u64::MAX;
    for x in text {
        if let Ok(i) = masks.binary_search_by_key(x, |&(t, _)| t) {
            let u = v & masks[i].1;
            v = v.wrapping_add(u) | (v - u);
        }
    }
    let low = if m == 64 { u64::MAX } else { (1u64 << m) - 1 };
    m as u32 - (v & low).count_ones()
}

/// ROUGE-L of a candidate against its references (token ids as `split(" ")`
/// gives them, so never empty).
pub fn rouge_l<'r>(
    cand: &[u32],
    refs: impl IntoIterator<Item = &'r [u32]>,
    row: &mut Vec<u32>,
) -> f64 {
    let mut masks = Vec::new();
    let bits = cand.len() <= 64;
    if bits {
        match_masks(cand, &mut masks);
    }
    let mut prec_max: f64 = 0.0;
    let mut rec_max: f64 = 0.0;
    for r in refs {
        let l = if bits {
            lcs_bits(&masks, cand.len(), r)
        } else {
            lcs(r, cand, row)
        };
        let l = f64::from(l);
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

    #[test]
    fn bit_parallel_lcs_equals_the_dynamic_programme() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (mut row, mut masks) = (Vec::new(), Vec::new());
        for case in 0..3000 {
            // small alphabets make long common subsequences; lengths reach the 64-token word
            let alphabet = [2, 4, 30][case % 3];
            let m = rng.gen_range(0..=64usize);
            let n = rng.gen_range(0..=80usize);
            let p: Vec<u32> = (0..m).map(|_| rng.gen_range(0..alphabet)).collect();
            let t: Vec<u32> = (0..n).map(|_| rng.gen_range(0..alphabet)).collect();
            match_masks(&p, &mut masks);
            assert_eq!(
                lcs_bits(&masks, m, &t),
                lcs(&p, &t, &mut row),
                "{p:?} {t:?}"
            );
        }
    }
}
