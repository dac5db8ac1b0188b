//! Load generator for `ecic serve` (scripts/bench-serve.sh drives it): N requests of one image
//! each, from C concurrent clients on loopback, and the throughput, latency percentiles and
//! errors they saw; optionally the server's resident memory (VmRSS, VmHWM from /proc) sampled
//! as the requests go, to show whether it stays flat.
//!
//! Usage: serve_load BASE_URL IMAGES.tsv CONCURRENCY REQUESTS [SERVER_PID]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;

fn rss_kb(pid: &str) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: serve_load BASE_URL IMAGES.tsv CONCURRENCY REQUESTS [SERVER_PID]");
        std::process::exit(2);
    }
    let (base, tsv) = (&args[1], &args[2]);
    let conc: usize = args[3].parse().expect("CONCURRENCY is a number");
    let total: usize = args[4].parse().expect("REQUESTS is a number");
    let pid = args.get(5).cloned();
    let bodies: Vec<String> = std::fs::read_to_string(tsv)
        .expect("reading IMAGES.tsv")
        .lines()
        .map(|l| {
            let (id, b64) = l.split_once('\t').expect("id<TAB>base64");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .expect("base64");
            serde_json::json!({"images": [{"id": id,
                "data": base64::engine::general_purpose::STANDARD.encode(bytes)}]})
            .to_string()
        })
        .collect();
    let url = format!("{base}/v1/captions");
    let next = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let rss_samples = std::sync::Mutex::new(Vec::new());
    let t0 = Instant::now();
    let mut lat: Vec<Duration> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..conc)
            .map(|_| {
                sc.spawn(|| {
                    let c = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(300))
                        .build()
                        .unwrap();
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            break;
                        }
                        let body = bodies[i % bodies.len()].clone();
                        let t = Instant::now();
                        let ok = c
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .map(|r| r.status().is_success() && r.bytes().is_ok())
                            .unwrap_or(false);
                        lat.push(t.elapsed());
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(pid) = &pid {
                            if i % 1000 == 999 {
                                rss_samples.lock().unwrap().push((i + 1, rss_kb(pid)));
                            }
                        }
                    }
                    lat
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e3
    };
    println!(
        "concurrency {conc:>3}  requests {total:>6}  errors {:>4}  {:>8.1} captions/s  p50 {:>8.1} ms  p99 {:>8.1} ms",
        errors.load(Ordering::Relaxed),
        total as f64 / wall,
        pct(0.50),
        pct(0.99)
    );
    let mut samples = rss_samples.into_inner().unwrap();
    samples.sort();
    for (n, (rss, hwm)) in samples {
        println!(
            "  after {n:>6} requests: server RSS {:>7.1} MiB, peak {:>7.1} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
}
