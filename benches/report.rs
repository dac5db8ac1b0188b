//! Time `write_report` (everything `ecic report` does after opening the
//! store) on a 27-cell sweep: 3 backbones × 3 PEFT × 3 fusions, 200 scored
//! images per cell (the default synthetic valid split), curves for every
//! training stage. Target: under 5 s. `ECIC_BENCH_KEEP=DIR` keeps one report.

use criterion::{criterion_group, criterion_main, Criterion};

use ecic::report::fixture::{build, Fixture};
use ecic::report::write_report;
use ecic::store::Store;

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let f = Fixture {
        name: "bench27".into(),
        images: 200,
        ..Fixture::default()
    };
    let (runs, id) = build(tmp.path(), &f).expect("fixture");
    let store = Store::open(&runs).expect("store");
    let out = std::env::var_os("ECIC_BENCH_KEEP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("r"));
    let t = std::time::Instant::now();
    write_report(&store, id, &out, false).expect("report");
    eprintln!(
        "27-cell report (first run, cold font cache): {:.3} s -> {}",
        t.elapsed().as_secs_f64(),
        out.display()
    );
    let mut g = c.benchmark_group("report");
    g.sample_size(10);
    g.bench_function("27 cells, 200 images", |b| {
        b.iter(|| write_report(&store, id, &out, false).expect("report"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
