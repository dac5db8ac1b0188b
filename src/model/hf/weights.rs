//! The weight files of a checkpoint directory: `model.safetensors` or the shards that
//! `model.safetensors.index.json` lists, indexed by tensor name from their headers alone, and
//! read tensor by tensor through memory maps while a model is filled.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::cfg::read_json;
use super::HfError;

/// Where each tensor of a checkpoint lives.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    dir: PathBuf,
    /// Weight files, in name order.
    files: Vec<PathBuf>,
    /// Tensor key -> where it is stored.
    keys: BTreeMap<String, Stored>,
}

impl Weights {
    /// Indexes the weight files of `dir` (headers only; no tensor data is read).
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| HfError::Config {
                    path: index.clone(),
                    msg: "weight_map is missing or not an object".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(HfError::Config {
                path: dir.to_path_buf(),
                msg: "neither model.safetensors nor model.safetensors.index.json is here".into(),
            });
        };
        let mut keys = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            keys.extend(header(f, i)?);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            keys,
        })
    }

    /// One safetensors file on its own (the weights a training stage wrote), read the same way.
    pub fn file(path: &Path) -> Result<Self, HfError> {
        Ok(Self {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            files: vec![path.to_path_buf()],
            keys: header(path, 0)?.into_iter().collect(),
        })
    }

    /// Every tensor name, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The weight files (for digests).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The first of `prefixes` under which `probe` is stored.
    pub fn prefix_of(&self, prefixes: &[&str], probe: &str) -> Option<String> {
        prefixes
            .iter()
            .find(|p| self.contains(&format!("{p}{probe}")))
            .map(|p| (*p).to_string())
    }

    pub fn missing(&self, key: &str) -> HfError {
        HfError::Missing {
            dir: self.dir.clone(),
            key: key.to_string(),
            files: self
                .files
                .iter()
                .filter_map(|f| f.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// A reader of this checkpoint's tensors onto `device`.
    pub fn reader(&self, device: &Device) -> Reader<'_> {
        Reader {
            weights: self,
            device: device.clone(),
            mapped: HashMap::new(),
        }
    }
}

/// Where one tensor's bytes are in its file, from the safetensors header.
#[derive(Debug, Clone)]
struct Stored {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    /// Byte range in the file (header included in the offset).
    start: usize,
    end: usize,
}

/// The tensors listed in a safetensors header (8-byte little-endian length, then JSON), without
/// reading the data.
fn header(path: &Path, file: usize) -> Result<Vec<(String, Stored)>, HfError> {
    use std::io::Read;
    let io = |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |msg: String| HfError::Safetensors {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg(format!("not a safetensors file: {msg}")),
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(io)?.len();
    if n > size.saturating_sub(8) {
        return Err(bad(format!("header length {n} exceeds the file")));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(io)?;
    let v: serde_json::Map<String, Value> =
        serde_json::from_slice(&head).map_err(|e| bad(e.to_string()))?;
    let base = 8 + n as usize;
    let mut out = Vec::with_capacity(v.len());
    for (k, t) in v {
        if k == "__metadata__" {
            continue;
        }
        let info = (|| {
            let dtype = t.get("dtype")?.as_str()?.to_string();
            let shape = t
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()?;
            let off = t.get("data_offsets")?.as_array()?;
            let (s, e) = (off.first()?.as_u64()?, off.get(1)?.as_u64()?);
            Some(Stored {
                file,
                dtype,
                shape,
                start: base + s as usize,
                end: base + e as usize,
            })
        })()
        .filter(|s| s.start <= s.end && s.end as u64 <= size)
        .ok_or_else(|| bad(format!("bad header entry for {k}")))?;
        out.push((k, info));
    }
    Ok(out)
}

/// Reads tensors of one checkpoint, mapping each file on first use. A tensor is read (and
/// converted to f32) only when asked for, and its pages are then released from this process
/// (`MADV_DONTNEED`; they stay in the page cache), so loading holds the model being filled plus
/// one tensor, never whole shards: resident file pages count in a process's RSS, and a 7B
/// checkpoint's shards are larger than its 4-bit copy.
pub(crate) struct Reader<'a> {
    weights: &'a Weights,
    device: Device,
    mapped: HashMap<usize, memmap2::Mmap>,
}

impl Reader<'_> {
    pub fn weights(&self) -> &Weights {
        self.weights
    }

    /// Tensor `key` as f32, with the file it came from.
    fn raw(&mut self, key: &str) -> Result<(Tensor, &Path), HfError> {
        let Some(s) = self.weights.keys.get(key) else {
            return Err(self.weights.missing(key));
        };
        let path = &self.weights.files[s.file];
        let err = |source| HfError::Safetensors {
            path: path.to_path_buf(),
            source,
        };
        let dtype = match s.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            other => {
                return Err(err(candle_core::Error::Msg(format!(
                    "tensor {key} has dtype {other}; floating-point weights expected"
                ))))
            }
        };
        if !self.mapped.contains_key(&s.file) {
            let f = std::fs::File::open(path).map_err(|source| HfError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            // SAFETY: the mapping is only read, and dropped when loading ends; as with every
            // safetensors loader, the file must not be truncated or rewritten meanwhile.
            let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| HfError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            self.mapped.insert(s.file, m);
        }
        let m = &self.mapped[&s.file];
        let t = Tensor::from_raw_buffer(&m[s.start..s.end], dtype, &s.shape, &self.device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(err)?;
        // The tensor is a copy now: release the pages just read. The range starts on the page
        // holding the tensor's first byte (madvise wants page-aligned starts); a neighbour's
        // bytes on a shared page are read again from the page cache if asked for.
        let page = page_size();
        let from = s.start / page * page;
        // SAFETY: no reference into the mapping outlives `from_raw_buffer` above, and on a
        // read-only file mapping MADV_DONTNEED only drops this process's page-table entries:
        // the next read of these bytes faults them in again from the file.
        unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, s.end - from) }
            .map_err(|source| HfError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok((t, path))
    }

    /// Tensor `key` as f32, whatever its shape.
    pub fn read(&mut self, key: &str) -> Result<Tensor, HfError> {
        Ok(self.raw(key)?.0)
    }

    /// Tensor `key` as f32, checked against `shape` (the one `config.json` implies).
    pub fn take(&mut self, key: &str, shape: &[usize]) -> Result<Tensor, HfError> {
        let (t, path) = self.raw(key)?;
        if t.dims() != shape {
            return Err(HfError::Shape {
                path: path.to_path_buf(),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// Tensors `keys`, each of shape `part`, concatenated along rows: separate projections
    /// (q/k/v, gate/up) that our model holds fused.
    pub fn rows(&mut self, keys: &[String], part: &[usize]) -> Result<Tensor, HfError> {
        let parts = keys
            .iter()
            .map(|k| self.take(k, part))
            .collect::<Result<Vec<_>, _>>()?;
        self.op(Tensor::cat(&parts, 0))
    }

    /// The result of a tensor operation on what was read (concatenating, splitting), its
    /// error naming the directory.
    pub fn op<T>(&self, r: candle_core::Result<T>) -> Result<T, HfError> {
        r.map_err(|source| HfError::Safetensors {
            path: self.weights.dir.clone(),
            source,
        })
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
