//! Speed of the caption metrics on a synthetic corpus shaped like MUGE
//! (~20-character Chinese captions, 5 references per image). The whole-process
//! comparison with pycocoevalcap is `scripts/bench-eval.sh`.

use criterion::{criterion_group, criterion_main, Criterion};
use ecic::metrics::{bootstrap, evaluate, CiderD, References, Tokenize};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn caption(rng: &mut ChaCha8Rng, len: usize) -> String {
    (0..len)
        .map(|_| char::from_u32(0x4E00 + 35 * rng.gen_range(0..600u32)).unwrap_or('字'))
        .collect()
}

type Corpus = (Vec<(String, String)>, Vec<(String, Vec<String>)>);

fn corpus(images: usize) -> Corpus {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut preds = Vec::with_capacity(images);
    let mut refs = Vec::with_capacity(images);
    for i in 0..images {
        let id = format!("{i:032x}");
        let len = rng.gen_range(12..28);
        let base = caption(&mut rng, len);
        let vary = |rng: &mut ChaCha8Rng| {
            let mut c: Vec<char> = base.chars().collect();
            for _ in 0..rng.gen_range(1..6) {
                let at = rng.gen_range(0..c.len());
                c[at] = char::from_u32(0x4E00 + rng.gen_range(0..20000u32)).unwrap_or('字');
            }
            c.into_iter().collect::<String>()
        };
        refs.push((id.clone(), (0..5).map(|_| vary(&mut rng)).collect()));
        preds.push((id, vary(&mut rng)));
    }
    (preds, refs)
}

fn bench(c: &mut Criterion) {
    let (preds, refs) = corpus(2000);
    let mut g = c.benchmark_group("metrics_2000x5");
    g.sample_size(10);
    g.bench_function("evaluate", |b| {
        b.iter(|| evaluate(&preds, &refs, Tokenize::Char))
    });
    let prepared = References::new(&refs, Tokenize::Char).unwrap_or_else(|e| panic!("{e}"));
    let texts: Vec<&str> = preds.iter().map(|p| p.1.as_str()).collect();
    g.bench_function("score_prepared", |b| {
        b.iter(|| prepared.evaluate_in_order(&texts))
    });
    let ev = prepared
        .evaluate_in_order(&texts)
        .unwrap_or_else(|e| panic!("{e}"));
    g.bench_function("bootstrap_1000", |b| {
        b.iter(|| bootstrap::confidence_interval(&ev.images, 1000, 1))
    });
    g.finish();

    // SCST: one sampled caption scored against fixed training references
    let train: Vec<Vec<String>> = refs.iter().map(|r| r.1.clone()).collect();
    let scorer = CiderD::new(&train, Tokenize::Char);
    c.bench_function("cider_d_score_one_caption", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % texts.len();
            scorer.score_text(i, texts[i])
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
