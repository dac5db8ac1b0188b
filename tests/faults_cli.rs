//! Faults found by breaking ecic as a new user and a hostile machine would,
//! each reproduced through the binary: empty and truncated data, an
//! overwritten data set, sizes that would exhaust memory, signals, a killed
//! sweep, a read-only runs directory, and the smaller ones (nan, `--set`,
//! a missing ALIGN file, a mistyped `--runs`, names that collide).

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use base64::Engine as _;

fn ecic() -> Command {
    let mut c = Command::cargo_bin("ecic").unwrap();
    c.env("NO_COLOR", "1");
    c
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const BASELINES: &str = r#"
name = "faults"
seeds = [0]
[data]
synth = { train = 16, valid = 6, test = 4, align = 8, foundation = 16 }
[grid]
backbone = ["nn"]
[stages.preprocess]
augment_copies = 0
[stages.evaluate]
predict_test = false
"#;

/// A small synthetic MUGE directory.
fn synth(dir: &Path) -> PathBuf {
    let d = dir.join("d");
    let out = ecic()
        .args(["data", "synth", "--out"])
        .arg(&d)
        .args([
            "--train", "12", "--valid", "6", "--test", "4", "--align", "8",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    d
}

fn write_spec(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn empty_splits_are_errors_naming_the_file_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = synth(dir.path());
    // CRLF-only captions: every training image is left out.
    std::fs::write(d.join("IC_train.jsonl"), "\r\n\r\n").unwrap();
    let spec = write_spec(
        dir.path(),
        &BASELINES.replace(
            "synth = { train = 16, valid = 6, test = 4, align = 8, foundation = 16 }",
            "source = \"d\"",
        ),
    );
    let runs = dir.path().join("runs");
    let out = ecic()
        .arg("sweep")
        .arg(&spec)
        .arg("--runs")
        .arg(&runs)
        .arg("--no-report")
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("IC_train: no usable image in"), "{t}");
    assert!(t.contains("IC_train.tsv"), "{t}");
    assert!(!t.contains("panicked"), "{t}");

    // An empty ALIGN_train with a trained backbone: the same, for pretrain-align's data.
    let d2 = dir.path().join("d2");
    std::fs::create_dir_all(&d2).unwrap();
    for f in std::fs::read_dir(&d).unwrap().flatten() {
        std::fs::copy(f.path(), d2.join(f.file_name())).unwrap();
    }
    std::fs::copy(
        synth(&dir.path().join("again")).join("IC_train.jsonl"),
        d2.join("IC_train.jsonl"),
    )
    .unwrap();
    std::fs::write(d2.join("ALIGN_train.tsv"), "").unwrap();
    std::fs::write(d2.join("ALIGN_train.jsonl"), "").unwrap();
    let spec = write_spec(
        dir.path(),
        &BASELINES
            .replace(
                "synth = { train = 16, valid = 6, test = 4, align = 8, foundation = 16 }",
                "source = \"d2\"",
            )
            .replace(
                "backbone = [\"nn\"]",
                "backbone = [\"llava\"]\npeft = [\"lora\"]\nfusion = [\"early\"]",
            ),
    );
    let out = ecic()
        .arg("sweep")
        .arg(&spec)
        .arg("--runs")
        .arg(dir.path().join("runs2"))
        .arg("--no-report")
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("ALIGN_train: no usable image in"), "{t}");

    // `data inspect` on a directory whose every file is empty.
    let e = dir.path().join("empty");
    std::fs::create_dir_all(&e).unwrap();
    for f in ["IC_train", "IC_valid", "IC_test"] {
        std::fs::write(e.join(format!("{f}.tsv")), "").unwrap();
        std::fs::write(e.join(format!("{f}.jsonl")), "").unwrap();
    }
    let out = ecic().args(["data", "inspect"]).arg(&e).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("splits without a usable image: 3"), "{t}");
    assert!(
        t.contains("no usable image in IC_train, IC_valid, IC_test"),
        "{t}"
    );
}

#[test]
fn a_truncated_jpeg_is_a_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let d = synth(dir.path());
    let path = d.join("IC_valid.tsv");
    let tsv = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = tsv.lines().map(str::to_owned).collect();
    let (id, b64) = lines[2].split_once('\t').unwrap();
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let cut = base64::engine::general_purpose::STANDARD.encode(&jpeg[..jpeg.len() * 2 / 3]);
    lines[2] = format!("{id}\t{cut}");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = ecic().args(["data", "inspect"]).arg(&d).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains(&format!("{}:3: truncated JPEG", path.display())),
        "{t}"
    );
}

#[test]
fn data_synth_does_not_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = synth(dir.path());
    let before = std::fs::read(d.join("IC_train.tsv")).unwrap();
    let out = ecic()
        .args(["data", "synth", "--seed", "9", "--out"])
        .arg(&d)
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("already holds a data set"), "{t}");
    assert!(t.contains("IC_train.tsv") && t.contains("--force"), "{t}");
    assert_eq!(std::fs::read(d.join("IC_train.tsv")).unwrap(), before);
    let out = ecic()
        .args([
            "data", "synth", "--force", "--seed", "9", "--train", "4", "--out",
        ])
        .arg(&d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(std::fs::read(d.join("IC_train.tsv")).unwrap(), before);
}

#[test]
fn sizes_that_would_exhaust_memory_are_spec_errors() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), BASELINES);
    let runs = dir.path().join("runs");
    for (set, key) in [
        ("peft.lora.r=100000000", "peft.lora.r"),
        ("model.max_len=100000000", "model.max_len"),
        ("data.synth.train=1000000000000", "data.synth.train"),
        (
            "stages.evaluate.beam_width=100000",
            "stages.evaluate.beam_width",
        ),
    ] {
        let out = ecic()
            .arg("plan")
            .arg(&spec)
            .args(["--set", set, "--runs"])
            .arg(&runs)
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{set}: {t}");
        assert!(t.contains(&format!("`{key}`")), "{set}: {t}");
        assert!(t.contains("over the limit"), "{set}: {t}");
        // Attributed to the --set argument, not to a line of the spec.
        assert!(t.contains(&format!("--set {set}: ")), "{set}: {t}");
    }
    // `plan` runs nothing: it wrote no data set for the rejected sizes.
    assert!(!runs.join("data").exists());

    // A 100,000-cell grid is refused before it is expanded.
    let lrs: Vec<String> = (1..=1000).map(|i| format!("{}e-6", i)).collect();
    let seeds: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let big = BASELINES
        .replace("seeds = [0]", &format!("seeds = [{}]", seeds.join(", ")))
        .replace(
            "backbone = [\"nn\"]",
            &format!(
                "backbone = [\"llava\"]\n\"stages.domain_adapt.lr\" = [{}]",
                lrs.join(", ")
            ),
        );
    let spec = write_spec(dir.path(), &big);
    let out = ecic()
        .arg("plan")
        .arg(&spec)
        .arg("--runs")
        .arg(&runs)
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("100000 cells"), "{t}");

    // eval --bootstrap
    let p = dir.path().join("p.jsonl");
    std::fs::write(&p, "{\"image_id\": \"a\", \"text\": \"红裙\"}\n").unwrap();
    let r = dir.path().join("r.jsonl");
    std::fs::write(&r, "{\"image_id\": \"a\", \"text\": [\"红裙\"]}\n").unwrap();
    let out = ecic()
        .arg("eval")
        .arg("--pred")
        .arg(&p)
        .arg("--refs")
        .arg(&r)
        .args(["--bootstrap", "100000000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("over the limit"), "{}", text(&out));
}

#[test]
fn spec_mistakes_say_what_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let plan = |spec: &Path, sets: &[&str]| {
        let mut c = ecic();
        c.arg("plan").arg(spec).arg("--runs").arg(&runs);
        for s in sets {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    // nan is named as such, not as "invalid type: null".
    let spec = write_spec(
        dir.path(),
        &format!("{BASELINES}\n[stages.domain_adapt]\nlr = nan\n"),
    );
    let out = plan(&spec, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("`stages.domain_adapt.lr`: must be a finite number (got NaN)"),
        "{t}"
    );
    assert!(!t.contains("null"), "{t}");
    let spec = write_spec(
        dir.path(),
        &format!("{BASELINES}\n[stages.domain_adapt]\nlr = 0.001\n"),
    );
    // A --set value is attributed to the --set, even where the file has the key.
    let out = plan(&spec, &["stages.domain_adapt.lr=-1"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("--set stages.domain_adapt.lr=-1: `stages.domain_adapt.lr`"),
        "{t}"
    );
    assert!(!t.contains("spec.toml:"), "{t}");
    // An unparsable value is an error, not a string.
    let out = plan(&spec, &["grid.backbone=[\"nn\", \"mfc\""]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("is not a TOML value"), "{t}");
    // A bare word still is a string.
    let out = plan(&spec, &["stages.evaluate.method=beam"]);
    assert!(out.status.success(), "{}", text(&out));
    // Names that would collide under reports/ or be cut short.
    for name in ["a/b", "a\\u0000b", "x@2"] {
        let spec = write_spec(
            dir.path(),
            &BASELINES.replace("name = \"faults\"", &format!("name = \"{name}\"")),
        );
        let out = plan(&spec, &[]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {t}");
        assert!(t.contains("`name`: must not contain"), "{name}: {t}");
    }
}

#[test]
fn a_missing_align_file_and_a_mistyped_runs_dir_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = synth(dir.path());
    std::fs::remove_file(d.join("ALIGN_train.tsv")).unwrap();
    let spec = write_spec(
        dir.path(),
        &BASELINES
            .replace(
                "synth = { train = 16, valid = 6, test = 4, align = 8, foundation = 16 }",
                "source = \"d\"",
            )
            .replace("backbone = [\"nn\"]", "backbone = [\"llava\"]"),
    );
    let out = ecic()
        .arg("plan")
        .arg(&spec)
        .arg("--runs")
        .arg(dir.path().join("runs"))
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains(&format!(
            "{} is missing",
            d.join("ALIGN_train.tsv").display()
        )),
        "{t}"
    );
    let out = ecic()
        .args(["status", "--runs"])
        .arg(dir.path().join("no-such-runs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("no such runs directory"),
        "{}",
        text(&out)
    );
}

/// Start a sweep of `spec` in the background.
fn start(spec: &Path, runs: &Path) -> std::process::Child {
    StdCommand::new(assert_cmd::cargo::cargo_bin("ecic"))
        .arg("sweep")
        .arg(spec)
        .arg("--runs")
        .arg(runs)
        .arg("--no-report")
        .args(["--jobs", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until the logs of `runs` say `needle` `n` times in all.
fn wait_for_log(runs: &Path, needle: &str, n: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let count: usize = std::fs::read_dir(runs.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .matches(needle)
                    .count()
            })
            .sum();
        if count >= n {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before its log said {needle:?}"
        );
        assert!(Instant::now() < deadline, "no {needle:?} in the logs");
        std::thread::yield_now();
    }
}

/// Processes whose command line holds `runs` (a sweep's stage children).
fn processes_of(runs: &Path) -> Vec<i32> {
    let needle = runs.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains("run-stage") && cmd.contains(&needle)).then_some(pid)
        })
        .collect()
}

fn sweep_status(runs: &Path) -> String {
    let out = ecic()
        .args(["status", "--runs"])
        .arg(runs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

const TRAINING: &str = r#"
name = "sig"
seeds = [0]
[data]
synth = { train = 24, valid = 8, test = 4, align = 24, foundation = 16 }
[grid]
backbone = ["llava"]
peft = ["lora"]
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
steps = 2000
batch_size = 4
ckpt_every = 50
"#;

#[test]
fn signals_stop_a_sweep_cleanly_and_a_killed_one_shows_as_died() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), TRAINING);
    let runs = dir.path().join("runs");
    for (i, (sig, name)) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut child = start(&spec, &runs);
        wait_for_log(&runs, "computing pretrain-align", i + 1, &mut child);
        // SAFETY: signalling the sweep this test started.
        unsafe { libc::kill(child.id() as i32, sig) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "{name}: {}", text(&out));
        assert!(
            processes_of(&runs).is_empty(),
            "{name}: stage processes outlived the sweep"
        );
        let status = sweep_status(&runs);
        assert!(status.contains("interrupted"), "{name}: {status}");
        assert!(!status.contains("running"), "{name}: {status}");
    }
    // kill -9: nothing can record the end; status must not say running forever.
    let mut child = start(&spec, &runs);
    wait_for_log(&runs, "computing pretrain-align", 4, &mut child);
    // SAFETY: signalling the sweep this test started and its stage processes.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    for pid in processes_of(&runs) {
        // SAFETY: a stage process of this test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = sweep_status(&runs);
    assert!(status.contains("died"), "{status}");
    assert!(!status.contains("running"), "{status}");
}

#[test]
fn interrupting_a_sweep_that_waits_leaves_the_others_stage_alone() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), TRAINING);
    let runs = dir.path().join("runs");
    let mut first = start(&spec, &runs);
    wait_for_log(&runs, "computing pretrain-align", 1, &mut first);
    // A second sweep of the same spec: its stage process waits for the key's lock.
    let mut second = start(&spec, &runs);
    let deadline = Instant::now() + Duration::from_secs(120);
    let one_shot = || {
        processes_of(&runs)
            .into_iter()
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !String::from_utf8_lossy(&cmd).contains("--serve")
            })
            .count()
    };
    // Both sweeps' one-shot stage processes for pretrain-align (pooled
    // workers of the first may still be there too).
    while one_shot() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second sweep never started its stage"
        );
        assert!(second.try_wait().unwrap().is_none());
        std::thread::yield_now();
    }
    // SAFETY: signalling the sweep this test started.
    unsafe { libc::kill(second.id() as i32, libc::SIGINT) };
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let conn = rusqlite::Connection::open(runs.join("ecic.sqlite")).unwrap();
    let state: String = conn
        .query_row(
            "SELECT status FROM stages WHERE kind = 'pretrain-align'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        state, "running",
        "the first sweep's live stage was relabelled"
    );
    // SAFETY: signalling the sweep this test started.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
}

#[test]
fn a_read_only_runs_dir_can_be_inspected() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), BASELINES);
    let runs = dir.path().join("runs");
    let out = ecic()
        .arg("sweep")
        .arg(&spec)
        .arg("--runs")
        .arg(&runs)
        .arg("--no-report")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let bin = assert_cmd::cargo::cargo_bin("ecic");
    let report = dir.path().join("report");
    let script = format!(
        "'{bin}' status --runs '{r}' && '{bin}' report faults --runs '{r}' --out '{o}' && \
         '{bin}' verify --runs '{r}'",
        bin = bin.display(),
        r = runs.display(),
        o = report.display()
    );
    // A read-only view of the directory: a read-only bind mount in a mount
    // namespace of our own where we may make one (root), else permissions.
    let root = unsafe { libc::geteuid() } == 0;
    let out = if root {
        StdCommand::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --bind '{r}' '{r}' && mount -o remount,bind,ro '{r}' && \
                 touch '{r}/probe' 2>/dev/null && exit 99; {script}",
                r = runs.display()
            ))
            .output()
            .unwrap()
    } else {
        chmod_tree(&runs, false);
        let out = StdCommand::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        chmod_tree(&runs, true);
        out
    };
    let t = text(&out);
    assert_ne!(out.status.code(), Some(99), "the view was writable: {t}");
    assert!(out.status.success(), "{t}");
    assert!(t.contains("faults"), "{t}");
    assert!(report.join("index.html").is_file());
}

fn chmod_tree(p: &Path, writable: bool) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |dir: bool| match (dir, writable) {
        (true, true) => 0o755,
        (true, false) => 0o555,
        (false, true) => 0o644,
        (false, false) => 0o444,
    };
    if p.is_dir() {
        if writable {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode(true))).unwrap();
        }
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chmod_tree(&e.path(), writable);
        }
        if !writable {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode(true))).unwrap();
        }
    } else {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode(false))).unwrap();
    }
}

#[test]
fn a_full_disk_leaves_no_truncated_chart_and_says_so_once() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not run: a small full filesystem needs a mount namespace (root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), BASELINES);
    let runs = dir.path().join("runs");
    let out = ecic()
        .arg("sweep")
        .arg(&spec)
        .arg("--runs")
        .arg(&runs)
        .arg("--no-report")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let full = dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("ecic");
    // A 40 KiB filesystem: too small for the charts. Its files are copied out
    // before the namespace (and the mount) goes away.
    let kept = dir.path().join("kept");
    let out = StdCommand::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=40k tmpfs '{f}' && '{bin}' report faults --runs '{r}' --out '{f}'; \
             rc=$?; cp -a '{f}' '{k}'; exit $rc",
            f = full.display(),
            bin = bin.display(),
            r = runs.display(),
            k = kept.display()
        ))
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert_eq!(t.matches("No space left on device").count(), 1, "{t}");
    for e in std::fs::read_dir(&kept).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".png") {
            assert!(!name.starts_with('.'), "a temporary was left: {name}");
            image::open(e.path()).unwrap_or_else(|err| panic!("{name} is truncated: {err}"));
        }
    }
}

/// Found by fuzzing the spec loader (fuzz/corpus/spec/empty-zip): an empty
/// `[[grid.zip]]` table panicked with an index out of bounds.
#[test]
fn an_empty_zip_table_is_a_spec_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &format!("{BASELINES}\n[[grid.zip]]\n"));
    let out = ecic()
        .arg("plan")
        .arg(&spec)
        .arg("--runs")
        .arg(dir.path().join("runs"))
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("`grid.zip.0`: names no axes to zip"), "{t}");
}
