//! Images in for captioning: a folder of JPEG/PNG/WebP files or a MUGE `.tsv`, each image
//! decoded and prepared exactly as the preprocess stage prepares a scored split (its clean view
//! and normalisation, with the parameters recorded in the preprocess entry), so that the
//! captions equal the evaluate stage's.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::muge::{self, BadReason, BadRecordPolicy, ReadOptions};

use super::{io_err, InferError};

/// How a model's input images are prepared: the preprocess parameters that matter at
/// inference (the side of the square input, per-channel mean and std on the [0, 1] scale).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageSpec {
    pub fn of(p: &crate::data::preprocess::PreprocessParams) -> ImageSpec {
        ImageSpec {
            size: p.image_size,
            mean: p.mean,
            std: p.std,
        }
    }

    /// The model input of one decoded image, CHW f32: the clean view, normalised as
    /// `Split::load` normalises a shard's u8 pixels.
    pub fn pixels(&self, img: image::DynamicImage) -> Vec<f32> {
        let rgb = img.into_rgb8();
        let view = crate::data::clean_view(&rgb, self.size);
        let plane = (self.size * self.size) as usize;
        let mut out = Vec::with_capacity(view.len());
        for (c, chan) in view.chunks_exact(plane).enumerate() {
            let (m, sd) = (self.mean[c], self.std[c]);
            out.extend(chan.iter().map(|&v| (f32::from(v) / 255.0 - m) / sd));
        }
        out
    }

    /// Decodes image bytes (JPEG, PNG or WebP; a JPEG cut short is refused) and prepares them.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Vec<f32>, BadReason> {
        muge::decode_image(bytes).map(|img| self.pixels(img))
    }
}

/// One image prepared for the model, or why it could not be.
pub struct Prepared {
    pub id: String,
    /// Where it came from, for messages: a file path, or `file.tsv:LINE`.
    pub origin: String,
    pub pixels: Result<Vec<f32>, String>,
}

/// What `--images` names.
pub enum ImageSource {
    /// A folder of image files; image ids are the file names without extension.
    Folder(Vec<PathBuf>),
    /// A MUGE `.tsv` (`image_id<TAB>base64`).
    Tsv(PathBuf),
}

/// File extensions read from a folder (lower case).
const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

impl ImageSource {
    pub fn open(path: &Path) -> Result<ImageSource, InferError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            for e in std::fs::read_dir(path).map_err(io_err(path))? {
                let p = e.map_err(io_err(path))?.path();
                let ext = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase);
                if p.is_file() && ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
                    files.push(p);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(InferError::Format {
                    path: path.to_path_buf(),
                    msg: format!("no image files ({}) in this folder", EXTENSIONS.join(", ")),
                });
            }
            return Ok(ImageSource::Folder(files));
        }
        if path.extension().and_then(|e| e.to_str()) != Some("tsv") {
            return Err(InferError::Format {
                path: path.to_path_buf(),
                msg: "neither a folder of images nor a MUGE .tsv".into(),
            });
        }
        Ok(ImageSource::Tsv(path.to_path_buf()))
    }

    /// How many images (lines, for a tsv) there are, for the progress bar.
    pub fn count(&self) -> Result<u64, InferError> {
        match self {
            ImageSource::Folder(f) => Ok(f.len() as u64),
            ImageSource::Tsv(p) => {
                use std::io::Read;
                let mut f = std::fs::File::open(p).map_err(io_err(p))?;
                let mut buf = vec![0u8; 1 << 20];
                let (mut n, mut last) = (0u64, b'\n');
                loop {
                    let k = f.read(&mut buf).map_err(io_err(p))?;
                    if k == 0 {
                        break;
                    }
                    n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
                    last = buf[k - 1];
                }
                Ok(n + u64::from(last != b'\n'))
            }
        }
    }

    /// Streams the prepared images in order, `chunk` at a time (decoded in parallel), to
    /// `sink`; a bad record or unreadable file comes as a [`Prepared`] with an error.
    pub fn for_each_chunk(
        &self,
        spec: &ImageSpec,
        chunk: usize,
        sink: &mut dyn FnMut(Vec<Prepared>) -> Result<(), InferError>,
    ) -> Result<(), InferError> {
        match self {
            ImageSource::Folder(files) => {
                for part in files.chunks(chunk.max(1)) {
                    let prepared = part
                        .par_iter()
                        .map(|p| Prepared {
                            id: p
                                .file_stem()
                                .map(|s| s.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                            origin: p.display().to_string(),
                            pixels: std::fs::read(p)
                                .map_err(|e| e.to_string())
                                .and_then(|b| spec.prepare(&b).map_err(|e| e.to_string())),
                        })
                        .collect();
                    sink(prepared)?;
                }
                Ok(())
            }
            ImageSource::Tsv(path) => read_tsv(path, spec, chunk, sink),
        }
    }
}

/// A tsv through the MUGE reader (its line checks, both base64 alphabets, the truncated-JPEG
/// check), references not required; bad lines come out in line order with the good ones.
fn read_tsv(
    path: &Path,
    spec: &ImageSpec,
    chunk: usize,
    sink: &mut dyn FnMut(Vec<Prepared>) -> Result<(), InferError>,
) -> Result<(), InferError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| InferError::Format {
            path: path.to_path_buf(),
            msg: "file name is not UTF-8".into(),
        })?;
    let opts = ReadOptions {
        policy: BadRecordPolicy::Skip,
        require_refs: false,
        chunk_lines: chunk.max(1),
        allow_empty: true,
        ..ReadOptions::default()
    };
    let file = path.display().to_string();
    let mut buf: Vec<Prepared> = Vec::new();
    let report = muge::read_split(
        dir,
        prefix,
        &opts,
        |_, img| spec.pixels(img),
        |records| -> Result<(), InferError> {
            for r in records {
                buf.push(Prepared {
                    id: r.image_id,
                    origin: format!("{file}:{}", r.line),
                    pixels: Ok(r.value),
                });
            }
            while buf.len() >= chunk {
                let rest = buf.split_off(chunk);
                sink(std::mem::replace(&mut buf, rest))?;
            }
            Ok(())
        },
    )
    .map_err(|e: InferError| e)?;
    if !buf.is_empty() {
        sink(std::mem::take(&mut buf))?;
    }
    // The reader reports bad lines once it has read the whole file (a jsonl beside the tsv
    // may add its own); they are listed after the good images.
    let bad: Vec<Prepared> = report
        .bad
        .into_iter()
        .filter(|b| b.file == path)
        .map(|b| Prepared {
            id: String::new(),
            origin: format!("{}:{}", b.file.display(), b.line),
            pixels: Err(b.reason.to_string()),
        })
        .collect();
    if !bad.is_empty() {
        sink(bad)?;
    }
    Ok(())
}
