//! Data: the first step of every pipeline. MUGE ECommerce-IC files are read
//! and validated ([`muge`]), the embedded default data set is drawn
//! ([`synth`]), images are decoded once into tensor shards and captions into
//! token ids ([`preprocess`], [`tokenizer`]) so that training never touches
//! a JPEG. [`content_digest`] names a data directory's contents for the
//! stage cache keys.

mod augment;
/// The clean view (centre square, resize) that `infer` prepares images with, as preprocess does.
pub(crate) use augment::clean_view;
pub mod cmd;
pub mod inspect;
mod lines;
pub mod muge;
pub mod preprocess;
pub mod synth;
pub mod tokenizer;

use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no data files (*.tsv, *.jsonl)")]
    Empty(PathBuf),
}

/// Whether `name` is a data file that [`content_digest`] covers.
fn is_data_file(name: &str) -> bool {
    name.ends_with(".tsv") || name.ends_with(".jsonl")
}

/// The blake3 digest (hex) of a data directory's contents: the top-level
/// `*.tsv` and `*.jsonl` files, in byte order of their names, each as its
/// name, its length and its bytes (lengths make the framing unambiguous).
/// Other files (READMEs, caches) do not count. Streams every file.
pub fn content_digest(dir: &Path) -> Result<String, DigestError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DigestError::Io { path, source }
    };
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_data_file(&name) && entry.file_type().map_err(io(&entry.path()))?.is_file() {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err(DigestError::Empty(dir.to_owned()));
    }
    names.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"ecic-data-digest-v1");
    let mut buf = vec![0u8; 1 << 16];
    for name in &names {
        let path = dir.join(name);
        let mut f = std::fs::File::open(&path).map_err(io(&path))?;
        let len = f.metadata().map_err(io(&path))?.len();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&len.to_le_bytes());
        let mut seen = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io(&path))?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            h.update(&buf[..n]);
        }
        if seen != len {
            return Err(DigestError::Io {
                path,
                source: std::io::Error::other("file changed while it was being hashed"),
            });
        }
    }
    Ok(h.finalize().to_hex().to_string())
}
