//! The winning cell out of the lab: `ecic predict` against the evaluate stage's captions,
//! `ecic export` (merged, and quantized) loaded back, and `ecic serve` over real HTTP on an
//! ephemeral loopback port. One tiny sweep (llava with LoRA, QLoRA and adapters) serves
//! every test of this file.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};
use std::sync::OnceLock;

use assert_cmd::Command;

const SPEC: &str = r#"
name = "serving"
seeds = [0]
[data]
synth = { train = 48, valid = 20, test = 4, align = 24, foundation = 24 }
[grid]
backbone = ["llava"]
peft = ["lora", "qlora", "adapter"]
fusion = ["early"]
[stages.preprocess]
augment_copies = 0
[stages.pretrain_vision]
steps = 3
batch_size = 8
[stages.pretrain_lm]
steps = 3
batch_size = 8
[stages.pretrain_align]
steps = 8
batch_size = 4
[stages.domain_adapt]
steps = 30
batch_size = 8
[stages.cider_optimize]
steps = 2
batch_size = 2
samples = 2
[stages.evaluate]
predict_test = false
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    runs: PathBuf,
    valid_tsv: PathBuf,
}

fn ecic() -> Command {
    let mut c = Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

/// The sweep, run once for the whole file.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let spec = root.join("spec.toml");
        std::fs::write(&spec, SPEC).unwrap();
        let runs = root.join("runs");
        let out = ecic()
            .arg("sweep")
            .arg(&spec)
            .arg("--runs")
            .arg(&runs)
            .arg("--no-report")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sweep failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let valid_tsv =
            common::find_file(&runs.join("data"), "IC_valid.tsv").expect("the synthetic data");
        Fixture {
            _dir: dir,
            root,
            runs,
            valid_tsv,
        }
    })
}

/// image id -> caption of a prediction file.
fn read_preds(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["image_id"].as_str().unwrap().to_owned(),
                v["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// image id -> caption of a cell's evaluate stage on valid, from the store.
fn evaluate_captions(runs: &Path, cell: &str) -> BTreeMap<String, String> {
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let mut st = conn
        .prepare(
            "SELECT cap.image_id, cap.caption FROM captions cap
             JOIN cell_stages cs ON cs.key = cap.stage_key AND cs.kind = 'evaluate'
             JOIN cells c ON c.id = cs.cell_id
             WHERE c.name = ?1 AND cap.split = 'valid'",
        )
        .unwrap();
    st.query_map([cell], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn cells(runs: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let mut st = conn
        .prepare("SELECT name FROM cells ORDER BY position")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn predict(model: &str, images: &Path, out: &Path) -> std::process::Output {
    let f = fixture();
    ecic()
        .arg("predict")
        .arg(model)
        .arg("--images")
        .arg(images)
        .arg("--out")
        .arg(out)
        .arg("--runs")
        .arg(&f.runs)
        .output()
        .unwrap()
}

fn export(model: &str, out: &Path, quantize: Option<&str>) {
    let f = fixture();
    let mut c = ecic();
    c.arg("export")
        .arg(model)
        .arg("--out")
        .arg(out)
        .arg("--runs")
        .arg(&f.runs);
    if let Some(q) = quantize {
        c.arg("--quantize").arg(q);
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "export {model} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn predict_and_export_repeat_the_evaluate_captions() {
    let f = fixture();
    let cells = cells(&f.runs);
    assert_eq!(cells.len(), 3, "{cells:?}");
    for cell in &cells {
        let expected = evaluate_captions(&f.runs, cell);
        assert_eq!(expected.len(), 20, "{cell}");
        let distinct: std::collections::HashSet<_> = expected.values().collect();
        assert!(distinct.len() > 1, "{cell}: one caption for every image");
        let model = format!("serving/{cell}");
        let out = f.root.join(format!("{cell}.jsonl"));
        let o = predict(&model, &f.valid_tsv, &out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(read_preds(&out), expected, "predict {model}");
        // The export (LoRA merged into the base) gives the same captions.
        let dir = f.root.join(format!("export-{cell}"));
        export(&model, &dir, None);
        let out2 = f.root.join(format!("{cell}-export.jsonl"));
        let o = predict(dir.to_str().unwrap(), &f.valid_tsv, &out2);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            read_preds(&out2),
            expected,
            "predict of the export of {model}"
        );
    }
}

#[test]
fn quantized_exports_load_and_are_smaller() {
    let f = fixture();
    let cell = &cells(&f.runs)[0];
    let model = format!("serving/{cell}");
    let full = f.root.join("q-full");
    export(&model, &full, None);
    let full_size = std::fs::metadata(full.join("ecic-model.safetensors"))
        .unwrap()
        .len();
    let mut sizes = Vec::new();
    for q in ["q8_0", "q4_0"] {
        let dir = f.root.join(format!("q-{q}"));
        export(&model, &dir, Some(q));
        let size = std::fs::metadata(dir.join("ecic-model.gguf"))
            .unwrap()
            .len();
        sizes.push(size);
        let out = f.root.join(format!("q-{q}.jsonl"));
        let o = predict(dir.to_str().unwrap(), &f.valid_tsv, &out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(read_preds(&out).len(), 20);
    }
    assert!(
        sizes[0] < full_size / 2 && sizes[1] < sizes[0],
        "f32 {full_size}, q8_0 {}, q4_0 {}",
        sizes[0],
        sizes[1]
    );
}

#[test]
fn predict_skips_unreadable_images_names_them_and_exits_1() {
    let f = fixture();
    let dir = f.root.join("folder");
    std::fs::create_dir_all(&dir).unwrap();
    // Two good images from the valid split, one file that is not an image.
    let tsv = std::fs::read_to_string(&f.valid_tsv).unwrap();
    for line in tsv.lines().take(2) {
        let (id, b64) = line.split_once('\t').unwrap();
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        std::fs::write(dir.join(format!("{id}.jpg")), bytes).unwrap();
    }
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    let out = f.root.join("folder.jsonl");
    let cell = &cells(&f.runs)[0];
    let o = predict(&format!("serving/{cell}"), &dir, &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("broken.png"), "{stderr}");
    let preds = read_preds(&out);
    assert_eq!(preds.len(), 2);
    let expected = evaluate_captions(&f.runs, cell);
    for (id, c) in &preds {
        assert_eq!(Some(c), expected.get(id), "{id}");
    }
    // A model that is not there: exit 2, naming it; nothing written.
    let missing = f.root.join("never.jsonl");
    let o = predict("serving/no-such-cell", &dir, &missing);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no cell `no-such-cell`"));
    assert!(!missing.exists());
}

#[test]
fn best_cell_is_the_highest_valid_cider() {
    let f = fixture();
    let conn = rusqlite::Connection::open(f.runs.join("ecic.sqlite")).unwrap();
    let best: String = conn
        .query_row(
            "SELECT cell FROM results WHERE sweep = 'serving' AND stage = 'evaluate'
             AND split = 'valid' AND metric = 'cider_d' ORDER BY value DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let out = f.root.join("best.jsonl");
    let o = predict("serving:best", &f.valid_tsv, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_preds(&out), evaluate_captions(&f.runs, &best));
}

// ---- ecic serve -------------------------------------------------------------------------

/// A running `ecic serve` on an ephemeral loopback port; killed if a test fails.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &str, extra: &[&str]) -> Server {
    let f = fixture();
    let mut child = StdCommand::new(assert_cmd::cargo::cargo_bin("ecic"))
        .arg("serve")
        .arg(model)
        .args(["--addr", "127.0.0.1:0", "--runs"])
        .arg(&f.runs)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("serve ended before listening").unwrap();
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.to_owned();
        }
    };
    Server { child, base }
}

/// The valid split's (id, JPEG bytes), in file order.
fn valid_images() -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    std::fs::read_to_string(&fixture().valid_tsv)
        .unwrap()
        .lines()
        .map(|l| {
            let (id, b64) = l.split_once('\t').unwrap();
            (
                id.to_owned(),
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
        })
        .collect()
}

fn json_body(images: &[(String, Vec<u8>)]) -> serde_json::Value {
    use base64::Engine;
    let imgs: Vec<serde_json::Value> = images
        .iter()
        .map(|(id, b)| {
            serde_json::json!({
                "id": id,
                "data": base64::engine::general_purpose::STANDARD.encode(b),
            })
        })
        .collect();
    serde_json::json!({ "images": imgs })
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap()
}

fn captions_of(resp: reqwest::blocking::Response) -> Vec<(String, String)> {
    let status = resp.status();
    let v: serde_json::Value = resp.json().unwrap();
    assert_eq!(status, 200, "{v}");
    caption_list(&v)
}

/// The (id, caption) pairs of an answer's `captions`.
fn caption_list(v: &serde_json::Value) -> Vec<(String, String)> {
    v["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["caption"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The value of an unlabelled metric line of the /metrics text.
fn metric(base: &str, name: &str) -> f64 {
    let text = client()
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn concurrent_requests_give_the_predict_captions() {
    let f = fixture();
    let cell = cells(&f.runs)[0].clone();
    let expected = evaluate_captions(&f.runs, &cell);
    let s = serve(
        &format!("serving/{cell}"),
        &["--max-batch", "8", "--max-wait-ms", "20"],
    );
    let images = valid_images();
    let base = s.base.clone();
    // 10 clients at once, 2 images each, half multipart and half JSON.
    let got: Vec<(String, String)> = std::thread::scope(|sc| {
        let handles: Vec<_> = images
            .chunks(2)
            .enumerate()
            .map(|(i, chunk)| {
                let base = base.clone();
                sc.spawn(move || {
                    let c = client();
                    let req = c.post(format!("{base}/v1/captions"));
                    let resp = if i % 2 == 0 {
                        let mut form = reqwest::blocking::multipart::Form::new();
                        for (id, bytes) in chunk {
                            form = form.part(
                                format!("f{id}"),
                                reqwest::blocking::multipart::Part::bytes(bytes.clone())
                                    .file_name(format!("{id}.jpg")),
                            );
                        }
                        req.multipart(form).send().unwrap()
                    } else {
                        req.json(&json_body(chunk)).send().unwrap()
                    };
                    captions_of(resp)
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let got: BTreeMap<String, String> = got.into_iter().collect();
    assert_eq!(got, expected);
    let health: serde_json::Value = client()
        .get(format!("{base}/healthz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(metric(&base, "ecic_images_total"), 20.0);
    assert_eq!(metric(&base, "ecic_batch_size_sum"), 20.0);
    assert!(metric(&base, "ecic_batch_size_count") <= 20.0);
}

#[test]
fn bad_inputs_are_refused_naming_the_part_and_the_server_goes_on() {
    let f = fixture();
    let cell = cells(&f.runs)[0].clone();
    let s = serve(
        &format!("serving/{cell}"),
        &["--max-body-bytes", "200000", "--max-images", "4"],
    );
    let c = client();
    let url = format!("{}/v1/captions", s.base);
    let images = valid_images();
    // A part that is not an image: 400 naming it.
    let form = reqwest::blocking::multipart::Form::new()
        .part(
            "a",
            reqwest::blocking::multipart::Part::bytes(images[0].1.clone()).file_name("a.jpg"),
        )
        .part(
            "b",
            reqwest::blocking::multipart::Part::bytes(b"hello".to_vec()).file_name("b.jpg"),
        );
    let r = c.post(&url).multipart(form).send().unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().unwrap();
    assert!(body.contains("part 1 (\\\"b\\\")"), "{body}");
    // Bad base64 in JSON: 400 naming the entry.
    let r = c
        .post(&url)
        .json(&serde_json::json!({ "images": ["%%%"] }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("images[0]"));
    // A truncated JPEG is not decoded as a grey picture.
    let cut = &images[0].1[..images[0].1.len() / 2];
    let r = c
        .post(&url)
        .json(&json_body(&[("cut".into(), cut.to_vec())]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("truncated JPEG"));
    // Bad decoding options: 400 naming the option.
    let mut body = json_body(&images[..1]);
    body["options"] = serde_json::json!({ "beam_width": 0 });
    let r = c.post(&url).json(&body).send().unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("beam_width"));
    body["options"] = serde_json::json!({ "bream_width": 2 });
    let r = c.post(&url).json(&body).send().unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("bream_width"));
    // More images than a request may carry, and a body over the limit: 413.
    let r = c.post(&url).json(&json_body(&images[..5])).send().unwrap();
    assert_eq!(r.status(), 413);
    let big = vec![b'x'; 300_000];
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    // Neither JSON nor multipart.
    let r = c.post(&url).body("hi").send().unwrap();
    assert_eq!(r.status(), 415);
    // An unknown job.
    let r = c.get(format!("{}/v1/jobs/0123", s.base)).send().unwrap();
    assert_eq!(r.status(), 404);
    // Still serving.
    let r = c.post(&url).json(&json_body(&images[..2])).send().unwrap();
    assert_eq!(captions_of(r).len(), 2);
}

/// Polls /metrics until the queue holds at least `n` images (the server's own count, so no
/// timing is assumed); false if `busy` (the request filling it) ended first.
fn wait_for_queue<T>(base: &str, n: f64, busy: &std::thread::ScopedJoinHandle<'_, T>) -> bool {
    loop {
        if metric(base, "ecic_queue_depth") >= n {
            return true;
        }
        if busy.is_finished() {
            return false;
        }
    }
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let f = fixture();
    let cell = cells(&f.runs)[0].clone();
    let s = serve(
        &format!("serving/{cell}"),
        &[
            "--max-batch",
            "1",
            "--max-wait-ms",
            "0",
            "--queue",
            "60",
            "--max-images",
            "60",
        ],
    );
    let images = valid_images();
    let many: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| (format!("x{i}"), images[i % images.len()].1.clone()))
        .collect();
    let url = format!("{}/v1/captions", s.base);
    std::thread::scope(|sc| {
        let first =
            sc.spawn(|| captions_of(client().post(&url).json(&json_body(&many)).send().unwrap()));
        assert!(
            wait_for_queue(&s.base, 50.0, &first),
            "the first request was answered before the queue was seen full"
        );
        // 60 more images fit only into an empty queue.
        let r = client().post(&url).json(&json_body(&many)).send().unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(first.join().unwrap().len(), 60);
    });
}

#[test]
fn sigterm_finishes_the_requests_in_flight_and_exits_0() {
    let f = fixture();
    let cell = cells(&f.runs)[0].clone();
    let mut s = serve(
        &format!("serving/{cell}"),
        &["--max-batch", "1", "--max-wait-ms", "0"],
    );
    let images = valid_images();
    let many: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("x{i}"), images[i % images.len()].1.clone()))
        .collect();
    let url = format!("{}/v1/captions", s.base);
    let base = s.base.clone();
    std::thread::scope(|sc| {
        let inflight =
            sc.spawn(|| captions_of(client().post(&url).json(&json_body(&many)).send().unwrap()));
        assert!(
            wait_for_queue(&base, 20.0, &inflight),
            "the request was answered before the queue was seen filled"
        );
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(s.child.id() as i32, libc::SIGTERM);
        }
        assert_eq!(inflight.join().unwrap().len(), 40);
    });
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(client().get(format!("{base}/healthz")).send().is_err());
}

#[test]
fn a_job_runs_in_the_background_and_answers_its_captions() {
    let f = fixture();
    let cell = cells(&f.runs)[0].clone();
    let expected = evaluate_captions(&f.runs, &cell);
    let s = serve(&format!("serving/{cell}"), &["--max-batch", "4"]);
    let c = client();
    let r = c
        .post(format!("{}/v1/jobs", s.base))
        .json(&json_body(&valid_images()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let done = loop {
        let v: serde_json::Value = c
            .get(format!("{}/v1/jobs/{id}", s.base))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_ne!(v["state"], "failed", "{v}");
        assert_eq!(v["total"], 20);
        if v["state"] == "done" {
            break v;
        }
    };
    let got: BTreeMap<String, String> = caption_list(&done).into_iter().collect();
    assert_eq!(got, expected);
}
