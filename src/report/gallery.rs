//! The sample gallery: a handful of evaluated images as thumbnails, with
//! their references (from the sweep's data directory, MUGE layout) and each
//! configuration's caption (from the store). Only the few images shown are
//! decoded; the TSV is scanned until they are found.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::store::Store;

use super::data::SweepData;
use super::ReportError;

/// Images shown.
pub const SAMPLES: usize = 6;
/// Thumbnail side in pixels.
pub const THUMB: u32 = 160;

#[derive(Debug, Clone)]
pub struct Sample {
    pub image_id: String,
    /// Thumbnail file beside `index.html`, if the image could be read.
    pub thumb: Option<String>,
    pub references: Vec<String>,
    /// (configuration, caption) in grid order.
    pub captions: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct Gallery {
    pub samples: Vec<Sample>,
    /// Why thumbnails or references are missing, if they are.
    pub note: Option<String>,
}

/// The data directory as recorded, resolved against the spec's directory
/// when relative and not found from here.
fn data_dir(data: &SweepData) -> PathBuf {
    let d = PathBuf::from(&data.meta.data_dir);
    if d.is_absolute() || d.exists() {
        return d;
    }
    Path::new(&data.meta.spec_path)
        .parent()
        .map(|p| p.join(&d))
        .filter(|p| p.exists())
        .unwrap_or(d)
}

pub fn build(store: &Store, data: &SweepData, out_dir: &Path) -> Result<Gallery, ReportError> {
    if data.split.is_empty() {
        return Ok(Gallery::default());
    }
    // the first seed of each configuration, in grid order
    let firsts: Vec<(String, &str)> = data
        .groups
        .iter()
        .filter_map(|g| {
            let c = &data.cells[*g.cells.first()?];
            c.stage_key("evaluate").map(|k| (g.name.clone(), k))
        })
        .collect();
    let mut by_group: Vec<(String, HashMap<String, String>)> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for (name, key) in &firsts {
        let rows = store.stage_captions(key, &data.split)?;
        if ids.is_empty() {
            ids = rows
                .iter()
                .take(SAMPLES)
                .map(|r| r.image_id.clone())
                .collect();
        }
        by_group.push((
            name.clone(),
            rows.into_iter().map(|r| (r.image_id, r.caption)).collect(),
        ));
    }
    if ids.is_empty() {
        return Ok(Gallery::default());
    }
    let dir = data_dir(data);
    let mut notes = Vec::new();
    let refs = read_refs(&dir.join(format!("IC_{}.jsonl", data.split)), &ids).unwrap_or_else(|e| {
        notes.push(e);
        BTreeMap::new()
    });
    let images =
        read_images(&dir.join(format!("IC_{}.tsv", data.split)), &ids).unwrap_or_else(|e| {
            notes.push(e);
            BTreeMap::new()
        });
    let mut samples = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let thumb = match images.get(id) {
            Some(Ok(img)) => {
                let file = format!("sample-{i}.png");
                let t = img.thumbnail(THUMB, THUMB);
                match t.save(out_dir.join(&file)) {
                    Ok(()) => Some(file),
                    Err(e) => {
                        notes.push(format!("{}: {e}", out_dir.join(&file).display()));
                        None
                    }
                }
            }
            Some(Err(e)) => {
                notes.push(format!("image {id}: {e}"));
                None
            }
            None => None,
        };
        let captions = by_group
            .iter()
            .filter_map(|(g, m)| m.get(id).map(|c| (g.clone(), c.clone())))
            .collect();
        samples.push(Sample {
            image_id: id.clone(),
            thumb,
            references: refs.get(id).cloned().unwrap_or_default(),
            captions,
        });
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    Ok(Gallery { samples, note })
}

fn read_refs(path: &Path, ids: &[String]) -> Result<BTreeMap<String, Vec<String>>, String> {
    #[derive(serde::Deserialize)]
    struct Line {
        image_id: serde_json::Value,
        #[serde(default)]
        text: Vec<String>,
    }
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in std::io::BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        let Ok(l) = serde_json::from_str::<Line>(&line) else {
            continue;
        };
        let id = match l.image_id {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        if ids.contains(&id) {
            out.insert(id, l.text);
            if out.len() == ids.len() {
                break;
            }
        }
    }
    Ok(out)
}

type Decoded = Result<image::DynamicImage, String>;

fn read_images(path: &Path, ids: &[String]) -> Result<BTreeMap<String, Decoded>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let Ok(line) = line else { break };
        let Some(tab) = line.iter().position(|&b| b == b'\t') else {
            continue;
        };
        let id = String::from_utf8_lossy(&line[..tab]).trim().to_string();
        if !ids.contains(&id) || out.contains_key(&id) {
            continue;
        }
        let b64: Vec<u8> = line[tab + 1..]
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&b64)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&b64))
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&b64))
            .map_err(|e| format!("bad base64: {e}"));
        let img = bytes.and_then(|b| {
            image::load_from_memory(&b).map_err(|e| format!("undecodable image: {e}"))
        });
        out.insert(id, img);
        if out.len() == ids.len() {
            break;
        }
    }
    Ok(out)
}
