//! Cache keys (docs/spec.md, "What each stage's key depends on"): a blake3
//! hash of a stage's kind, its per-kind format version, its own resolved
//! parameters, its inputs' keys (a Merkle chain), the data set's content
//! digest and the seed. Output paths are never part of a key.
//!
//! Parameters are hashed through a canonical encoding: object keys sorted,
//! every number tagged as integer or float, floats by their IEEE bits, strings
//! length-prefixed. So TOML key order, whitespace and comments cannot change a
//! key, and `1e-3` and `0.001` are the same value.

use serde_json::Value;

/// Everything a stage's key depends on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    pub kind: String,
    pub version: u32,
    pub params: Value,
    /// Input keys, in the stage's fixed input order.
    pub inputs: Vec<String>,
    pub data_digest: String,
    pub seed: u64,
}

impl Fingerprint {
    /// The hex key.
    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"ecic-stage-key-v1\0");
        write_str(&mut h, &self.kind);
        h.update(&self.version.to_le_bytes());
        canonical(&mut h, &self.params);
        h.update(&(self.inputs.len() as u64).to_le_bytes());
        for k in &self.inputs {
            write_str(&mut h, k);
        }
        write_str(&mut h, &self.data_digest);
        h.update(&self.seed.to_le_bytes());
        h.finalize().to_hex().to_string()
    }
}

fn write_str(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// Feed a JSON value to the hasher in canonical form.
pub fn canonical(h: &mut blake3::Hasher, v: &Value) {
    match v {
        Value::Null => {
            h.update(b"n");
        }
        Value::Bool(b) => {
            h.update(if *b { b"T" } else { b"F" });
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                h.update(b"i");
                h.update(&i.to_le_bytes());
            } else if let Some(u) = n.as_u64() {
                h.update(b"u");
                h.update(&u.to_le_bytes());
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                h.update(b"f");
                h.update(&f.to_bits().to_le_bytes());
            }
        }
        Value::String(s) => {
            h.update(b"s");
            write_str(h, s);
        }
        Value::Array(a) => {
            h.update(b"[");
            h.update(&(a.len() as u64).to_le_bytes());
            for x in a {
                canonical(h, x);
            }
        }
        Value::Object(m) => {
            h.update(b"{");
            h.update(&(m.len() as u64).to_le_bytes());
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                write_str(h, k);
                canonical(h, &m[k]);
            }
        }
    }
}

/// Hash of any serializable value in canonical form (spec hashes, digests).
pub fn hash_value(v: &Value) -> String {
    let mut h = blake3::Hasher::new();
    canonical(&mut h, v);
    h.finalize().to_hex().to_string()
}
