//! Read-side queries (status, summaries, reports).

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// One cell's headline metrics for a split.
#[derive(Debug, Clone)]
pub struct CellSummary {
    pub cell: String,
    pub backbone: String,
    pub peft: String,
    pub fusion: String,
    pub seed: i64,
    pub overrides: String,
    /// metric name -> value (raw scale), from the cell's evaluate stage.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Wall seconds over the cell's stages (shared stages count fully).
    pub wall_s: f64,
    pub stages_run: i64,
    pub stages_reused: i64,
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct SweepInfo {
    pub id: i64,
    pub name: String,
    /// 1, 2, ...: a name run again with another spec adds a revision.
    pub revision: i64,
    /// How many revisions the name has.
    pub revisions: i64,
    pub status: String,
    pub started_at: f64,
    pub finished_at: Option<f64>,
    pub spec_path: String,
    pub cells: i64,
}

impl SweepInfo {
    /// The name as users give it back: `name`, or `name@N` where the name has
    /// several revisions.
    pub fn label(&self) -> String {
        revision_label(&self.name, self.revision, self.revisions)
    }
}

pub(crate) fn revision_label(name: &str, revision: i64, revisions: i64) -> String {
    if revisions > 1 {
        format!("{name}@{revision}")
    } else {
        name.to_string()
    }
}

/// `name@N` -> (`name`, Some(N)); anything else is a plain name.
fn split_revision(target: &str) -> (&str, Option<i64>) {
    match target.rsplit_once('@') {
        Some((name, rev)) if !name.is_empty() => match rev.parse::<i64>() {
            Ok(n) if n >= 1 => (name, Some(n)),
            _ => (target, None),
        },
        _ => (target, None),
    }
}

impl Store {
    /// The row id of a sweep: `name` is its latest revision, `name@N` revision N.
    pub fn sweep_id(&self, target: &str) -> Result<i64, StoreError> {
        let (name, rev) = split_revision(target);
        let found = match rev {
            Some(n) => self
                .conn
                .query_row(
                    "SELECT id FROM sweeps WHERE name = ?1 AND revision = ?2",
                    params![name, n],
                    |r| r.get(0),
                )
                .optional(),
            None => self
                .conn
                .query_row(
                    "SELECT id FROM sweeps WHERE name = ?1 ORDER BY revision DESC LIMIT 1",
                    [name],
                    |r| r.get(0),
                )
                .optional(),
        };
        found
            .map_err(self.err())?
            .ok_or_else(|| StoreError::NoSweep(target.to_string()))
    }

    /// A recorded status as it stands: `running` for a sweep no process runs
    /// any more (killed with SIGKILL, or the machine went down) is `died`.
    pub(crate) fn live_status(&self, sweep_id: i64, status: String) -> String {
        let runs = self.path.parent().unwrap_or(std::path::Path::new("."));
        if status == "running" && !crate::cache::sweep_alive(runs, sweep_id) {
            "died".to_string()
        } else {
            status
        }
    }

    /// The revision of a sweep row and how many revisions its name has.
    pub fn revision(&self, sweep_id: i64) -> Result<(i64, i64), StoreError> {
        self.conn
            .query_row(
                "SELECT s.revision, (SELECT COUNT(*) FROM sweeps s2 WHERE s2.name = s.name)
                 FROM sweeps s WHERE s.id = ?1",
                [sweep_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.err())
    }

    /// Every recorded sweep revision, oldest first.
    pub fn sweeps(&self) -> Result<Vec<SweepInfo>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT s.id, s.name, s.status, s.started_at, s.finished_at, s.spec_path,
                        (SELECT COUNT(*) FROM cells c WHERE c.sweep_id = s.id), s.revision,
                        (SELECT COUNT(*) FROM sweeps s2 WHERE s2.name = s.name)
                 FROM sweeps s ORDER BY s.started_at, s.id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(SweepInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    status: self.live_status(r.get(0)?, r.get(2)?),
                    started_at: r.get(3)?,
                    finished_at: r.get(4)?,
                    spec_path: r.get(5)?,
                    cells: r.get(6)?,
                    revision: r.get(7)?,
                    revisions: r.get(8)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Per-cell summary of a sweep: evaluate metrics on `split`, timings, reuse.
    pub fn cell_summaries(
        &self,
        sweep_id: i64,
        split: &str,
    ) -> Result<Vec<CellSummary>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT c.id, c.name, c.backbone, c.peft, c.fusion, c.seed, c.overrides
                 FROM cells c WHERE c.sweep_id = ?1 ORDER BY c.position",
            )
            .map_err(self.err())?;
        let cells: Vec<(i64, String, String, String, String, i64, String)> = st
            .query_map([sweep_id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        let mut out = Vec::new();
        for (id, cell, backbone, peft, fusion, seed, overrides) in cells {
            let mut metrics = std::collections::BTreeMap::new();
            let mut m = self
                .conn
                .prepare(
                    "SELECT m.metric, m.value FROM cell_stages cs JOIN metrics m ON m.stage_key = cs.key
                     WHERE cs.cell_id = ?1 AND cs.kind = 'evaluate' AND m.split = ?2",
                )
                .map_err(self.err())?;
            for row in m
                .query_map(params![id, split], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?))
                })
                .map_err(self.err())?
            {
                let (k, v) = row.map_err(self.err())?;
                metrics.insert(k, v);
            }
            let (wall_s, statuses): (f64, String) = self
                .conn
                .query_row(
                    "SELECT COALESCE(SUM(s.wall_s), 0), COALESCE(GROUP_CONCAT(s.status), '')
                     FROM cell_stages cs JOIN stages s ON s.key = cs.key WHERE cs.cell_id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(self.err())?;
            let (run, reused): (i64, i64) = self
                .conn
                .query_row(
                    "SELECT COALESCE(SUM(ss.reused = 0), 0), COALESCE(SUM(ss.reused = 1), 0)
                     FROM cell_stages cs JOIN sweep_stages ss ON ss.key = cs.key AND ss.sweep_id = ?2
                     WHERE cs.cell_id = ?1",
                    params![id, sweep_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(self.err())?;
            let status = if statuses.split(',').all(|s| s == "done") {
                "done"
            } else if statuses.contains("failed") {
                "failed"
            } else if statuses.contains("skipped") {
                "skipped"
            } else if statuses.contains("interrupted") {
                "interrupted"
            } else if statuses.contains("stopped") {
                // A search trial successive halving stopped early.
                "stopped"
            } else {
                "pending"
            };
            out.push(CellSummary {
                cell,
                backbone,
                peft,
                fusion,
                seed,
                overrides,
                metrics,
                wall_s,
                stages_run: run,
                stages_reused: reused,
                status: status.to_string(),
            });
        }
        Ok(out)
    }

    /// Stage rows of a sweep: (key, kind, label, status, wall_s, reused, error).
    #[expect(clippy::type_complexity)]
    pub fn sweep_stages(
        &self,
        sweep_id: i64,
    ) -> Result<
        Vec<(
            String,
            String,
            String,
            String,
            Option<f64>,
            bool,
            Option<String>,
        )>,
        StoreError,
    > {
        let mut st = self
            .conn
            .prepare(
                "SELECT s.key, s.kind, s.label, s.status, s.wall_s, ss.reused, s.error
                 FROM sweep_stages ss JOIN stages s ON s.key = ss.key WHERE ss.sweep_id = ?1
                 ORDER BY CASE s.kind WHEN 'preprocess' THEN 0 WHEN 'pretrain-align' THEN 1
                   WHEN 'domain-adapt' THEN 2 WHEN 'cider-optimize' THEN 3 ELSE 4 END, s.label",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([sweep_id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get::<_, i64>(5)? != 0,
                    r.get(6)?,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Every stage key a recorded sweep revision references (for `ecic gc`):
    /// of every revision, or with `keep_last = Some(n)` of the latest `n`
    /// revisions of each name.
    pub fn referenced_keys(
        &self,
        keep_last: Option<usize>,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT DISTINCT ss.key FROM sweep_stages ss JOIN sweeps s ON s.id = ss.sweep_id
                 WHERE ?1 < 0 OR (SELECT COUNT(*) FROM sweeps s2
                                  WHERE s2.name = s.name AND s2.revision > s.revision) < ?1",
            )
            .map_err(self.err())?;
        let n = keep_last.map_or(-1, |n| n.min(i64::MAX as usize) as i64);
        let rows = st
            .query_map([n], |r| r.get::<_, String>(0))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Stages whose results the store has (ended done and ingested).
    pub fn done_keys(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT key FROM stages WHERE status = 'done' AND finished_at IS NOT NULL")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}
