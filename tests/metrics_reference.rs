//! `src/metrics` against pycocoevalcap 1.2 itself: the fixtures under
//! `tests/fixtures/metrics/` were written by `scripts/metric_fixtures.py`
//! (run it through `scripts/metric-fixtures.sh`), which feeds pycocoevalcap
//! the strings a Python port of our tokenizer produced. Corpus and per-image
//! scores must agree to 1e-9, and our tokenizer must give those strings.

use std::path::Path;

use ecic::metrics::{
    bootstrap, evaluate, tokenize, CiderD, Evaluation, References, Scores, Tokenize,
};
use serde::Deserialize;

const TOL: f64 = 1e-9;

#[derive(Deserialize)]
struct Fixture {
    name: String,
    tokenize: Tokenize,
    corpus: Scores,
    images: Vec<Image>,
}

#[derive(Deserialize)]
struct Image {
    image_id: String,
    pred: String,
    refs: Vec<String>,
    pred_fed: String,
    refs_fed: Vec<String>,
    bleu: [f64; 4],
    rouge_l: f64,
    cider_d: f64,
}

fn load(name: &str) -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/metrics")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOL,
        "{what}: got {got:.17}, pycocoevalcap {want:.17}"
    );
}

fn run(f: &Fixture) -> Evaluation {
    let preds: Vec<(String, String)> = f
        .images
        .iter()
        .map(|i| (i.image_id.clone(), i.pred.clone()))
        .collect();
    let refs: Vec<(String, Vec<String>)> = f
        .images
        .iter()
        .map(|i| (i.image_id.clone(), i.refs.clone()))
        .collect();
    evaluate(&preds, &refs, f.tokenize).unwrap_or_else(|e| panic!("{}: {e}", f.name))
}

fn check(name: &str) {
    let f = load(name);
    for im in &f.images {
        assert_eq!(
            tokenize(&im.pred, f.tokenize).join(" "),
            im.pred_fed,
            "{name} {} pred",
            im.image_id
        );
        for (r, fed) in im.refs.iter().zip(&im.refs_fed) {
            assert_eq!(
                tokenize(r, f.tokenize).join(" "),
                *fed,
                "{name} {} ref",
                im.image_id
            );
        }
    }
    let ev = run(&f);
    let (got, want) = (&ev.scores, &f.corpus);
    assert_eq!(got.images, want.images);
    for (k, (g, w)) in got.bleu().iter().zip(want.bleu()).enumerate() {
        close(&format!("{name} corpus BLEU-{}", k + 1), *g, w);
    }
    close(&format!("{name} corpus ROUGE-L"), got.rouge_l, want.rouge_l);
    close(&format!("{name} corpus CIDEr-D"), got.cider_d, want.cider_d);
    assert_eq!(ev.images.len(), f.images.len());
    for (g, w) in ev.images.iter().zip(&f.images) {
        assert_eq!(g.image_id, w.image_id);
        for k in 0..4 {
            close(
                &format!("{name} {} BLEU-{}", w.image_id, k + 1),
                g.bleu[k],
                w.bleu[k],
            );
        }
        close(
            &format!("{name} {} ROUGE-L", w.image_id),
            g.rouge_l,
            w.rouge_l,
        );
        close(
            &format!("{name} {} CIDEr-D", w.image_id),
            g.cider_d,
            w.cider_d,
        );
    }
}

#[test]
fn edge_cases_match_pycocoevalcap() {
    check("edge_char");
}

#[test]
fn single_image_corpus_matches_pycocoevalcap() {
    check("single_image");
}

#[test]
fn space_mode_matches_pycocoevalcap() {
    check("space_mode");
}

#[test]
fn random_corpus_matches_pycocoevalcap() {
    check("random_char");
}

/// The records alone reproduce the corpus scores: what the store keeps is
/// enough for reports.
#[test]
fn corpus_scores_are_recomputed_from_records() {
    let f = load("random_char");
    let ev = run(&f);
    let again = Scores::from_images(&ev.images);
    for (g, w) in again.bleu().iter().zip(f.corpus.bleu()) {
        close("records BLEU", *g, w);
    }
    close("records CIDEr-D", again.cider_d, f.corpus.cider_d);
    let roundtrip: Vec<ecic::metrics::ImageScore> =
        serde_json::from_str(&serde_json::to_string(&ev.images).unwrap_or_default())
            .unwrap_or_default();
    // JSON keeps the counts exactly and the floats to the last bit or so
    assert_eq!(roundtrip.len(), ev.images.len());
    for (r, e) in roundtrip.iter().zip(&ev.images) {
        assert_eq!((&r.image_id, r.counts), (&e.image_id, e.counts));
        close("json CIDEr-D", r.cider_d, e.cider_d);
        close("json ROUGE-L", r.rouge_l, e.rouge_l);
    }
}

/// The reusable scorer (SCST) gives the evaluation's per-image CIDEr-D when
/// its references are the evaluated split.
#[test]
fn cider_scorer_matches_per_image_fixture() {
    let f = load("edge_char");
    let refs: Vec<Vec<String>> = f.images.iter().map(|i| i.refs.clone()).collect();
    let scorer = CiderD::new(&refs, f.tokenize);
    assert_eq!(scorer.images(), f.images.len());
    for (i, im) in f.images.iter().enumerate() {
        let by_text = scorer.score_text(i, &im.pred).unwrap_or(f64::NAN);
        close(&format!("scorer {}", im.image_id), by_text, im.cider_d);
        let toks: Vec<&str> = im.pred_fed.split(' ').filter(|t| !t.is_empty()).collect();
        let by_tokens = scorer.score(i, &toks).unwrap_or(f64::NAN);
        close(
            &format!("scorer tokens {}", im.image_id),
            by_tokens,
            im.cider_d,
        );
    }
}

/// Scoring the same references twice (`--compare`) reuses the prepared
/// corpus and agrees with a fresh evaluation.
#[test]
fn prepared_references_score_in_order() {
    let f = load("edge_char");
    let refs: Vec<(String, Vec<String>)> = f
        .images
        .iter()
        .map(|i| (i.image_id.clone(), i.refs.clone()))
        .collect();
    let prepared = References::new(&refs, f.tokenize).unwrap_or_else(|e| panic!("{e}"));
    let preds: Vec<&str> = f.images.iter().map(|i| i.pred.as_str()).collect();
    let ev = prepared
        .evaluate_in_order(&preds)
        .unwrap_or_else(|e| panic!("{e}"));
    close("in order CIDEr-D", ev.scores.cider_d, f.corpus.cider_d);
    assert!(prepared.evaluate_in_order(&preds[1..]).is_err());
}

#[test]
fn bootstrap_is_seeded_and_brackets_the_estimate() {
    let f = load("random_char");
    let ev = run(&f);
    let a = bootstrap::confidence_interval(&ev.images, 200, 7).unwrap_or_default();
    let b = bootstrap::confidence_interval(&ev.images, 200, 7).unwrap_or_default();
    let c = bootstrap::confidence_interval(&ev.images, 200, 8).unwrap_or_default();
    assert_eq!(a.len(), 6);
    assert_eq!(a, b);
    assert_ne!(a, c);
    for iv in &a {
        assert!(iv.low < iv.estimate && iv.estimate < iv.high, "{iv:?}");
    }
    assert!(bootstrap::confidence_interval(&ev.images, 0, 7).is_err());
}

#[test]
fn paired_bootstrap_tells_a_better_system_from_a_tie() {
    let f = load("random_char");
    let good = run(&f);
    // B: each prediction replaced by the previous image's, a much worse system
    let n = f.images.len();
    let preds: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                f.images[i].image_id.clone(),
                f.images[(i + n - 1) % n].pred.clone(),
            )
        })
        .collect();
    let refs: Vec<(String, Vec<String>)> = f
        .images
        .iter()
        .map(|i| (i.image_id.clone(), i.refs.clone()))
        .collect();
    let bad = evaluate(&preds, &refs, f.tokenize).unwrap_or_else(|e| panic!("{e}"));
    let resamples = 500;
    let better = bootstrap::paired(&good.images, &bad.images, resamples, 1).unwrap_or_default();
    let floor = 1.0 / (resamples as f64 + 1.0);
    assert_eq!(better.len(), 6);
    for p in &better {
        assert!(p.delta > 0.0 && p.low > 0.0, "{p:?}");
        assert_eq!(p.p_value, floor, "{p:?}");
    }
    let worse = bootstrap::paired(&bad.images, &good.images, resamples, 1).unwrap_or_default();
    assert!(worse.iter().all(|p| p.p_value > 0.99), "{worse:?}");
    let tie = bootstrap::paired(&good.images, &good.images, resamples, 1).unwrap_or_default();
    assert!(
        tie.iter().all(|p| p.p_value == 1.0 && p.delta == 0.0),
        "{tie:?}"
    );
    // B listed in another order is matched by image id
    let mut shuffled = bad.images.clone();
    shuffled.reverse();
    let again = bootstrap::paired(&good.images, &shuffled, resamples, 1).unwrap_or_default();
    assert_eq!(again, better);
    assert!(bootstrap::paired(&good.images, &bad.images[1..], resamples, 1).is_err());
}
