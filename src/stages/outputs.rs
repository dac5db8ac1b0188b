//! Writers for the files every stage may publish: `metrics.json`
//! (`{split: {metric: value}}`), `curves.jsonl` and `captions.jsonl`, the
//! formats [`crate::cache::StageOutputs`] reads back into the store.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::cache::CaptionRecord;

use super::StageError;

#[derive(Debug, Default)]
pub struct Outputs {
    pub metrics: BTreeMap<String, BTreeMap<String, f64>>,
    pub curves: Vec<(u64, String, f64)>,
    pub captions: Vec<CaptionRecord>,
}

impl Outputs {
    pub fn metric(&mut self, split: &str, name: &str, value: f64) {
        self.metrics
            .entry(split.to_string())
            .or_default()
            .insert(name.to_string(), value);
    }

    pub fn curve(&mut self, step: u64, name: &str, value: f64) {
        self.curves.push((step, name.to_string(), value));
    }

    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        let ctx = |p: &Path| StageError::ctx(format!("writing {}", p.display()));
        let p = dir.join("metrics.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&self.metrics).expect("json"))
            .map_err(ctx(&p))?;
        if !self.curves.is_empty() {
            let p = dir.join("curves.jsonl");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(ctx(&p))?);
            for (step, name, value) in &self.curves {
                let line = serde_json::json!({"step": step, "name": name, "value": value});
                writeln!(f, "{line}").map_err(ctx(&p))?;
            }
            f.flush().map_err(ctx(&p))?;
        }
        if !self.captions.is_empty() {
            let p = dir.join("captions.jsonl");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(ctx(&p))?);
            for c in &self.captions {
                writeln!(f, "{}", serde_json::to_string(c).expect("json")).map_err(ctx(&p))?;
            }
            f.flush().map_err(ctx(&p))?;
        }
        Ok(())
    }
}
