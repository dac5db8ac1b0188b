//! Trusting the cache, at the library level: every published file has a
//! digest, damage of each kind is found, damaged entries are moved aside and
//! become misses, the store never imports a damaged result, checkpoints are
//! checked when resumed, and the data digest's memo is not fooled by an edit
//! that keeps size and mtime.

use std::path::Path;

use ecic::cache::{Cache, CacheError, Damage, Manifest};

fn manifest(key: &str) -> Manifest {
    Manifest {
        key: key.into(),
        kind: "evaluate".into(),
        label: "x".into(),
        params: serde_json::Value::Null,
        inputs: vec![],
        kind_version: 1,
        ecic_version: "0".into(),
        data_digest: "d".into(),
        seed: 0,
        started_at: 0.0,
        finished_at: 0.0,
        wall_s: 0.0,
        cpu_s: None,
        peak_rss_kb: None,
        git_commit: None,
        host: None,
        threads: 1,
        trainable_params: None,
        total_params: None,
        files: vec![],
        digests: Default::default(),
    }
}

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// An entry with results, a weights-like file in a subdirectory and a log.
fn publish(cache: &Cache) {
    let p = cache.begin(KEY).unwrap();
    let d = p.dir().to_path_buf();
    std::fs::write(
        d.join("metrics.json"),
        br#"{"valid": {"cider_d": 0.4, "bleu4": 0.1}}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("curves.jsonl"),
        "{\"step\": 1, \"name\": \"loss\", \"value\": 2.5}\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("valid")).unwrap();
    std::fs::write(d.join("valid/shard-00000.safetensors"), vec![7u8; 4096]).unwrap();
    std::fs::write(d.join("stage.log"), b"computing x\n").unwrap();
    p.publish(&manifest(KEY)).unwrap();
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[test]
fn publish_records_a_digest_of_every_file_but_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    publish(&cache);
    let m = cache.verify(KEY).unwrap();
    let files: Vec<&str> = m.digests.keys().map(String::as_str).collect();
    assert_eq!(
        files,
        [
            "curves.jsonl",
            "metrics.json",
            "valid/shard-00000.safetensors"
        ]
    );
    assert_eq!(m.digests["valid/shard-00000.safetensors"].size, 4096);
    assert_eq!(
        m.digests["valid/shard-00000.safetensors"].blake3,
        blake3::hash(&[7u8; 4096]).to_hex().to_string()
    );
    // The log is not a result: it may grow, the entry stays sound.
    std::fs::write(cache.entry(KEY).join("stage.log"), b"more\n").unwrap();
    assert!(cache.verify(KEY).is_ok());
}

#[test]
fn every_kind_of_damage_is_found_and_named() {
    type Damager = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damager)> = vec![
        (
            "flipped byte",
            Box::new(|e: &Path| flip(&e.join("valid/shard-00000.safetensors"), 100)),
        ),
        (
            "truncated",
            Box::new(|e: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(e.join("valid/shard-00000.safetensors"))
                    .unwrap();
                f.set_len(10).unwrap();
            }),
        ),
        (
            "deleted",
            Box::new(|e: &Path| std::fs::remove_file(e.join("metrics.json")).unwrap()),
        ),
        (
            "manifest garbage",
            Box::new(|e: &Path| std::fs::write(e.join("manifest.json"), b"{").unwrap()),
        ),
        (
            "manifest without digests",
            Box::new(|e: &Path| {
                let mut m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.join("manifest.json")).unwrap())
                        .unwrap();
                m.as_object_mut().unwrap().remove("digests");
                std::fs::write(e.join("manifest.json"), m.to_string()).unwrap();
            }),
        ),
    ];
    for (what, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        publish(&cache);
        damage(&cache.entry(KEY));
        let err = cache.verify(KEY).unwrap_err();
        let text = err.to_string();
        match what {
            "flipped byte" => {
                assert!(matches!(err, Damage::Digest { .. }), "{what}: {text}");
                assert!(text.contains("valid/shard-00000.safetensors"), "{text}");
            }
            "truncated" => {
                assert_eq!(
                    err,
                    Damage::Size {
                        file: "valid/shard-00000.safetensors".into(),
                        expected: 4096,
                        found: 10
                    }
                );
            }
            "deleted" => assert_eq!(
                err,
                Damage::Missing {
                    file: "metrics.json".into()
                }
            ),
            "manifest garbage" => assert!(matches!(err, Damage::Manifest(_)), "{text}"),
            _ => assert_eq!(err, Damage::NoDigests),
        }
        // Moved aside, with the reason beside it: the key is a miss again.
        assert!(cache.is_complete(KEY));
        let q = cache.quarantine(KEY, err.clone()).unwrap();
        let to = q.moved_to.expect("moved");
        assert!(to.starts_with(dir.path().join("quarantine")), "{to:?}");
        assert!(!cache.is_complete(KEY), "{what}: still a hit");
        assert_eq!(
            std::fs::read_to_string(to.join("damage.txt")).unwrap(),
            format!("{err}\n")
        );
    }
}

#[test]
fn the_store_never_imports_a_damaged_result() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    publish(&cache);
    let good = cache.outputs(KEY).unwrap();
    assert!(good
        .metrics
        .iter()
        .any(|(s, m, v)| s == "valid" && m == "cider_d" && *v == 0.4));
    // An edited metric, same length: parses fine, but is not what was computed.
    let path = cache.entry(KEY).join("metrics.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("0.4", "0.9")).unwrap();
    match cache.outputs(KEY) {
        Err(CacheError::Damaged { entry, damage }) => {
            assert_eq!(entry, cache.entry(KEY));
            assert!(matches!(damage, Damage::Digest { ref file, .. } if file == "metrics.json"));
        }
        other => panic!("imported an edited metric: {other:?}"),
    }
    // A missing metrics file is damage too, not a stage without metrics.
    std::fs::remove_file(&path).unwrap();
    let err = cache.outputs(KEY).unwrap_err();
    assert!(err.to_string().contains("metrics.json: missing"), "{err}");
}

#[test]
fn gc_waits_for_no_sweep_and_removes_older_roots_and_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    publish(&cache);
    // A sweep holds the root lock shared: gc cannot take it.
    let held = cache.root_lock(false).unwrap();
    let err = cache.root_lock(true).err().expect("gc must not run now");
    assert!(matches!(err, CacheError::Busy { .. }), "{err}");
    drop(held);
    let _gc = cache.root_lock(true).unwrap();
    std::fs::create_dir_all(dir.path().join("objects-v0/abc")).unwrap();
    std::fs::create_dir_all(dir.path().join("objects-v10")).unwrap();
    let q = cache.quarantine(KEY, Damage::NoDigests).unwrap();
    let keep = std::collections::HashSet::new();
    let removed = cache.gc(&keep, true).unwrap();
    let q_to = q.moved_to.unwrap();
    assert!(
        removed.contains(&dir.path().join("objects-v0")),
        "{removed:?}"
    );
    assert!(removed.contains(&q_to), "{removed:?}");
    // objects-v10 is not older than objects-v1: kept. The live root too.
    assert!(!removed.contains(&dir.path().join("objects-v10")));
    assert!(!removed.contains(&dir.path().join("objects-v1")));
    cache.gc(&keep, false).unwrap();
    assert!(!dir.path().join("objects-v0").exists());
    assert!(!q_to.exists());
}

#[test]
fn data_digest_sees_an_edit_that_keeps_size_and_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    std::fs::create_dir_all(&data).unwrap();
    let f = data.join("IC_valid.jsonl");
    std::fs::write(&f, "{\"image_id\": \"a\", \"text\": [\"红色连衣裙\"]}\n").unwrap();
    let old = std::fs::metadata(&f).unwrap().modified().unwrap();
    // Old enough that its memo entry is trusted (not racily clean).
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(past)
        .unwrap();
    let _ = old;
    let memo = dir.path().join("memo.json");
    let d1 = ecic::cache::data_digest(&data, &memo).unwrap();
    // Wait out the racy window without sleeping: the memo entry must be
    // trusted on the next call, so that only the ctime/inode check can catch
    // the edit below. The file's ctime is its creation just now, so rewrite
    // the memo's hash time as if it had been hashed later.
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&memo).unwrap()).unwrap();
    for e in m["files"].as_object_mut().unwrap().values_mut() {
        let later = e["ctime_ns"].as_i64().unwrap() + 10_000_000_000;
        e["hashed_at_ns"] = serde_json::json!(later);
    }
    std::fs::write(&memo, m.to_string()).unwrap();
    assert_eq!(ecic::cache::data_digest(&data, &memo).unwrap(), d1);
    // `cp -p`: new content, same size, mtime set back.
    std::fs::write(&f, "{\"image_id\": \"a\", \"text\": [\"蓝色连衣裙\"]}\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(past)
        .unwrap();
    let d2 = ecic::cache::data_digest(&data, &memo).unwrap();
    assert_ne!(d1, d2, "a stale digest: the edit was not seen");
}

#[test]
fn error_chains_do_not_repeat_a_source_the_message_already_holds() {
    let io = std::io::Error::other("No space left on device (os error 28)");
    let e = CacheError::Io {
        path: "/r/x".into(),
        source: io,
    };
    assert_eq!(
        ecic::stages::error_chain(&e),
        "/r/x: No space left on device (os error 28)"
    );
}
