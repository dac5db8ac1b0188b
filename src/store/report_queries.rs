//! Read-only queries behind `ecic report`, `ecic compare` and the terminal
//! summaries. Each returns plain rows; `crate::report` turns them into the
//! tables and plots. Bulk queries (one per table and sweep) keep a 27-cell
//! report to a handful of statements.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// A sweep's row, as the report's header and provenance section show it.
#[derive(Debug, Clone)]
pub struct SweepMeta {
    pub id: i64,
    /// The sweep's name as users give it back: `name@N` where the name has
    /// several revisions (see [`SweepInfo::label`](super::read::SweepInfo::label)).
    pub name: String,
    pub spec_path: String,
    pub spec_text: String,
    /// `--set` overrides (JSON list, as stored).
    pub sets: String,
    /// Grid axis names (JSON list, as stored).
    pub axes: String,
    pub data_dir: String,
    pub data_digest: String,
    pub executor: String,
    pub jobs: i64,
    pub git_commit: Option<String>,
    pub host: Option<String>,
    pub ecic_version: String,
    pub started_at: f64,
    pub finished_at: Option<f64>,
    pub status: String,
}

/// A cell with the keys of its stages, in pipeline order.
#[derive(Debug, Clone)]
pub struct CellStages {
    pub id: i64,
    pub name: String,
    pub backbone: String,
    pub peft: String,
    pub fusion: String,
    pub seed: i64,
    /// Non-named axis values (JSON object, as stored).
    pub overrides: String,
    /// (kind, key).
    pub stages: Vec<(String, String)>,
}

/// A stage the sweep references.
#[derive(Debug, Clone)]
pub struct StageInfo {
    pub key: String,
    pub kind: String,
    pub label: String,
    pub status: String,
    pub wall_s: Option<f64>,
    /// Found complete in the cache when this sweep ran.
    pub reused: bool,
    pub trainable_params: Option<i64>,
    pub total_params: Option<i64>,
    pub error: Option<String>,
}

/// One metric value of a stage.
#[derive(Debug, Clone)]
pub struct MetricRow {
    pub key: String,
    pub split: String,
    pub metric: String,
    pub value: f64,
}

/// One point of a stage's curve.
#[derive(Debug, Clone)]
pub struct CurvePoint {
    pub key: String,
    pub name: String,
    pub step: i64,
    pub value: f64,
}

/// One generated caption with its per-image score record (JSON), if any.
#[derive(Debug, Clone)]
pub struct CaptionRow {
    pub image_id: String,
    pub caption: String,
    pub scores: Option<String>,
}

/// Pipeline order of stage kinds in SQL (unknown kinds last).
const KIND_ORDER: &str = "CASE s.kind WHEN 'preprocess' THEN 0 WHEN 'pretrain-align' THEN 1
    WHEN 'domain-adapt' THEN 2 WHEN 'cider-optimize' THEN 3 WHEN 'evaluate' THEN 4 ELSE 5 END";

impl Store {
    pub fn sweep_meta(&self, sweep_id: i64) -> Result<SweepMeta, StoreError> {
        self.conn
            .query_row(
                "SELECT id, name, spec_path, spec_text, sets, axes, data_dir, data_digest, executor, jobs,
                        git_commit, host, ecic_version, started_at, finished_at, status, revision,
                        (SELECT COUNT(*) FROM sweeps s2 WHERE s2.name = sweeps.name)
                 FROM sweeps WHERE id = ?1",
                [sweep_id],
                |r| {
                    Ok(SweepMeta {
                        id: r.get(0)?,
                        name: super::read::revision_label(
                            &r.get::<_, String>(1)?,
                            r.get(16)?,
                            r.get(17)?,
                        ),
                        spec_path: r.get(2)?,
                        spec_text: r.get(3)?,
                        sets: r.get(4)?,
                        axes: r.get(5)?,
                        data_dir: r.get(6)?,
                        data_digest: r.get(7)?,
                        executor: r.get(8)?,
                        jobs: r.get(9)?,
                        git_commit: r.get(10)?,
                        host: r.get(11)?,
                        ecic_version: r.get(12)?,
                        started_at: r.get(13)?,
                        finished_at: r.get(14)?,
                        status: self.live_status(r.get(0)?, r.get(15)?),
                    })
                },
            )
            .optional()
            .map_err(self.err())?
            .ok_or_else(|| StoreError::NoSweep(format!("#{sweep_id}")))
    }

    /// The cells of a sweep in grid order, each with its stage keys.
    pub fn cells_with_stages(&self, sweep_id: i64) -> Result<Vec<CellStages>, StoreError> {
        let order = KIND_ORDER.replace("s.kind", "cs.kind");
        let sql = format!(
            "SELECT c.id, c.name, c.backbone, c.peft, c.fusion, c.seed, c.overrides, cs.kind, cs.key
             FROM cells c LEFT JOIN cell_stages cs ON cs.cell_id = c.id
             WHERE c.sweep_id = ?1 ORDER BY c.position, c.id, {order}"
        );
        let mut st = self.conn.prepare(&sql).map_err(self.err())?;
        let mut out: Vec<CellStages> = Vec::new();
        let mut rows = st.query([sweep_id]).map_err(self.err())?;
        while let Some(r) = rows.next().map_err(self.err())? {
            let id: i64 = r.get(0).map_err(self.err())?;
            if out.last().map(|c| c.id) != Some(id) {
                out.push(CellStages {
                    id,
                    name: r.get(1).map_err(self.err())?,
                    backbone: r.get(2).map_err(self.err())?,
                    peft: r.get(3).map_err(self.err())?,
                    fusion: r.get(4).map_err(self.err())?,
                    seed: r.get(5).map_err(self.err())?,
                    overrides: r.get(6).map_err(self.err())?,
                    stages: Vec::new(),
                });
            }
            let kind: Option<String> = r.get(7).map_err(self.err())?;
            let key: Option<String> = r.get(8).map_err(self.err())?;
            if let (Some(kind), Some(key), Some(cell)) = (kind, key, out.last_mut()) {
                cell.stages.push((kind, key));
            }
        }
        Ok(out)
    }

    /// Every stage the sweep references, in pipeline order.
    pub fn stage_infos(&self, sweep_id: i64) -> Result<Vec<StageInfo>, StoreError> {
        let sql = format!(
            "SELECT s.key, s.kind, s.label, s.status, s.wall_s, ss.reused, s.trainable_params, s.total_params,
                    s.error
             FROM sweep_stages ss JOIN stages s ON s.key = ss.key WHERE ss.sweep_id = ?1
             ORDER BY {KIND_ORDER}, s.label"
        );
        let mut st = self.conn.prepare(&sql).map_err(self.err())?;
        let rows = st
            .query_map([sweep_id], |r| {
                Ok(StageInfo {
                    key: r.get(0)?,
                    kind: r.get(1)?,
                    label: r.get(2)?,
                    status: r.get(3)?,
                    wall_s: r.get(4)?,
                    reused: r.get::<_, i64>(5)? != 0,
                    trainable_params: r.get(6)?,
                    total_params: r.get(7)?,
                    error: r.get(8)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Every metric of every stage the sweep references.
    pub fn sweep_metrics(&self, sweep_id: i64) -> Result<Vec<MetricRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT m.stage_key, m.split, m.metric, m.value
                 FROM sweep_stages ss JOIN metrics m ON m.stage_key = ss.key WHERE ss.sweep_id = ?1",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([sweep_id], |r| {
                Ok(MetricRow {
                    key: r.get(0)?,
                    split: r.get(1)?,
                    metric: r.get(2)?,
                    value: r.get(3)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Every curve point of every stage the sweep references, by stage, name, step.
    pub fn sweep_curves(&self, sweep_id: i64) -> Result<Vec<CurvePoint>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT c.stage_key, c.name, c.step, c.value
                 FROM sweep_stages ss JOIN curves c ON c.stage_key = ss.key WHERE ss.sweep_id = ?1
                 ORDER BY c.stage_key, c.name, c.step",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([sweep_id], |r| {
                Ok(CurvePoint {
                    key: r.get(0)?,
                    name: r.get(1)?,
                    step: r.get(2)?,
                    value: r.get(3)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The captions a stage wrote for a split, by image id.
    pub fn stage_captions(&self, key: &str, split: &str) -> Result<Vec<CaptionRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT image_id, caption, scores FROM captions WHERE stage_key = ?1 AND split = ?2
                 ORDER BY image_id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![key, split], |r| {
                Ok(CaptionRow {
                    image_id: r.get(0)?,
                    caption: r.get(1)?,
                    scores: r.get(2)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The sweep's events by kind (`what`) with their counts.
    pub fn event_counts(&self, sweep_id: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT what, COUNT(*) FROM events WHERE sweep_id = ?1 GROUP BY what ORDER BY what",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([sweep_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Stage counts by status over the whole store (for `ecic status`).
    pub fn stage_status_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT status, COUNT(*) FROM stages GROUP BY status ORDER BY status")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}
