//! Write-side operations, called by the orchestrator only.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::{now, Store, StoreError};

/// A sweep as recorded when it starts.
#[derive(Debug, Clone)]
pub struct SweepRow {
    pub name: String,
    pub spec_path: String,
    pub spec_text: String,
    pub sets: Vec<String>,
    pub spec_hash: String,
    pub axes: Vec<String>,
    pub data_dir: String,
    pub data_digest: String,
    pub executor: String,
    pub jobs: usize,
    pub git_commit: Option<String>,
    pub host: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CellRow {
    pub name: String,
    pub backbone: String,
    pub peft: String,
    pub fusion: String,
    pub seed: u64,
    pub overrides: Value,
    /// (kind, key) of the cell's stages.
    pub stages: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct StageRow {
    pub key: String,
    pub kind: String,
    pub label: String,
    pub params: Value,
    pub inputs: Vec<String>,
    pub reused: bool,
}

/// One write of the orchestrator's event sink, applied with others in one
/// transaction by [`Store::apply`]. Times are those of the event, not of the
/// commit.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// The stage started (`at`: Unix seconds).
    Started {
        key: String,
        host: Option<String>,
        job_id: Option<String>,
        at: f64,
    },
    /// The stage failed / was skipped / interrupted (see [`Store::stage_ended`]).
    Ended {
        key: String,
        status: String,
        error: Option<String>,
        wall_s: Option<f64>,
        at: f64,
    },
    /// The stage completed: its outputs, read from the cache.
    Ingest(Box<crate::cache::StageOutputs>),
    /// A row of the sweep's event log (see [`Store::log_event`]).
    Event {
        sweep: i64,
        key: Option<String>,
        what: String,
        detail: Option<String>,
        at: f64,
    },
}

impl Store {
    /// Record the start of a sweep with its cells and planned stages, in one
    /// transaction. A name run again with the same resolved spec (`spec_hash`,
    /// which includes `--set` and environment overrides) on the same data
    /// continues its latest revision (a resumed or repeated run: the same cells
    /// again); anything else adds a revision, leaving the earlier ones as they
    /// were recorded. Returns the sweep's row id.
    pub fn begin_sweep(
        &mut self,
        sweep: &SweepRow,
        cells: &[CellRow],
        stages: &[StageRow],
    ) -> Result<i64, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let latest: Option<(i64, i64, String, String)> = tx
            .query_row(
                "SELECT id, revision, spec_hash, data_digest FROM sweeps WHERE name = ?1
                 ORDER BY revision DESC LIMIT 1",
                [&sweep.name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(err)?;
        let sets = serde_json::to_string(&sweep.sets).unwrap_or_default();
        let axes = serde_json::to_string(&sweep.axes).unwrap_or_default();
        let (existing, revision) = match latest {
            Some((id, rev, hash, data)) if hash == sweep.spec_hash && data == sweep.data_digest => {
                (Some(id), rev)
            }
            Some((_, rev, _, _)) => (None, rev + 1),
            None => (None, 1),
        };
        let id = match existing {
            Some(id) => {
                tx.execute(
                    "UPDATE sweeps SET spec_path=?2, spec_text=?3, sets=?4, spec_hash=?5, axes=?6, data_dir=?7,
                     data_digest=?8, executor=?9, jobs=?10, git_commit=?11, host=?12, ecic_version=?13,
                     started_at=?14, finished_at=NULL, status='running' WHERE id=?1",
                    params![
                        id, sweep.spec_path, sweep.spec_text, sets, sweep.spec_hash, axes, sweep.data_dir,
                        sweep.data_digest, sweep.executor, sweep.jobs as i64, sweep.git_commit, sweep.host,
                        env!("CARGO_PKG_VERSION"), now()
                    ],
                )
                .map_err(err)?;
                tx.execute("DELETE FROM cells WHERE sweep_id = ?1", [id])
                    .map_err(err)?;
                tx.execute("DELETE FROM sweep_stages WHERE sweep_id = ?1", [id])
                    .map_err(err)?;
                id
            }
            None => {
                tx.execute(
                    "INSERT INTO sweeps (name, spec_path, spec_text, sets, spec_hash, axes, data_dir, data_digest,
                     executor, jobs, git_commit, host, ecic_version, started_at, status, revision)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'running', ?15)",
                    params![
                        sweep.name, sweep.spec_path, sweep.spec_text, sets, sweep.spec_hash, axes, sweep.data_dir,
                        sweep.data_digest, sweep.executor, sweep.jobs as i64, sweep.git_commit, sweep.host,
                        env!("CARGO_PKG_VERSION"), now(), revision
                    ],
                )
                .map_err(err)?;
                tx.last_insert_rowid()
            }
        };
        {
            let mut ins_stage = tx
                .prepare(
                    "INSERT INTO stages (key, kind, label, params, inputs, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(key) DO UPDATE SET status = CASE WHEN stages.status = 'done' THEN 'done'
                       WHEN excluded.status = 'done' THEN 'done' ELSE 'planned' END, error = CASE WHEN
                       excluded.status = 'done' OR stages.status = 'done' THEN stages.error ELSE NULL END",
                )
                .map_err(err)?;
            let mut ins_ss =
                tx.prepare("INSERT OR REPLACE INTO sweep_stages (sweep_id, key, reused) VALUES (?1, ?2, ?3)").map_err(err)?;
            for s in stages {
                let status = if s.reused { "done" } else { "planned" };
                ins_stage
                    .execute(params![
                        s.key,
                        s.kind,
                        s.label,
                        s.params.to_string(),
                        serde_json::to_string(&s.inputs).unwrap_or_default(),
                        status
                    ])
                    .map_err(err)?;
                ins_ss
                    .execute(params![id, s.key, s.reused as i64])
                    .map_err(err)?;
            }
            let mut ins_cell = tx
                .prepare(
                    "INSERT INTO cells (sweep_id, name, backbone, peft, fusion, seed, overrides, position)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(err)?;
            let mut ins_cs = tx
                .prepare(
                    "INSERT OR REPLACE INTO cell_stages (cell_id, kind, key) VALUES (?1, ?2, ?3)",
                )
                .map_err(err)?;
            for (pos, c) in cells.iter().enumerate() {
                ins_cell
                    .execute(params![
                        id,
                        c.name,
                        c.backbone,
                        c.peft,
                        c.fusion,
                        c.seed as i64,
                        c.overrides.to_string(),
                        pos as i64
                    ])
                    .map_err(err)?;
                let cell_id = tx.last_insert_rowid();
                for (kind, key) in &c.stages {
                    ins_cs.execute(params![cell_id, kind, key]).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(id)
    }

    pub fn finish_sweep(&self, id: i64, status: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE sweeps SET finished_at = ?2, status = ?3 WHERE id = ?1",
                params![id, now(), status],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn stage_started(
        &self,
        key: &str,
        host: Option<&str>,
        job_id: Option<&str>,
    ) -> Result<(), StoreError> {
        started(&self.conn, key, host, job_id, now()).map_err(self.err())
    }

    /// Mark a stage failed / skipped / interrupted.
    pub fn stage_ended(
        &self,
        key: &str,
        status: &str,
        error: Option<&str>,
        wall_s: Option<f64>,
    ) -> Result<(), StoreError> {
        ended(&self.conn, key, status, error, wall_s, now()).map_err(self.err())
    }

    pub fn log_event(
        &self,
        sweep: i64,
        key: Option<&str>,
        what: &str,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO events (sweep_id, at, key, what, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![sweep, now(), key, what, detail],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Ingest a completed stage: its manifest's timings, its metrics, curves and
    /// captions, in one transaction (idempotent: re-ingesting replaces).
    pub fn ingest(&mut self, out: &crate::cache::StageOutputs) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        ingest(&tx, out).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Apply `ops` in order, in one transaction: one commit for every stage
    /// that finished since the last batch, instead of one (or two) per stage.
    /// All or nothing; where the batch fails, each op is applied in a
    /// transaction of its own, so that one bad op costs only its own record.
    /// Returns the errors, one per failed op.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Vec<StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let batch = |conn: &mut rusqlite::Connection, ops: &[StoreOp]| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for op in ops {
                apply_op(&tx, op)?;
            }
            tx.commit()
        };
        if ops.is_empty() || batch(&mut self.conn, ops).is_ok() {
            return Vec::new();
        }
        ops.iter()
            .filter_map(|op| batch(&mut self.conn, std::slice::from_ref(op)).err())
            .map(err)
            .collect()
    }
}

fn apply_op(conn: &rusqlite::Connection, op: &StoreOp) -> rusqlite::Result<()> {
    match op {
        StoreOp::Started {
            key,
            host,
            job_id,
            at,
        } => started(conn, key, host.as_deref(), job_id.as_deref(), *at),
        StoreOp::Ended {
            key,
            status,
            error,
            wall_s,
            at,
        } => ended(conn, key, status, error.as_deref(), *wall_s, *at),
        StoreOp::Ingest(out) => ingest(conn, out),
        StoreOp::Event {
            sweep,
            key,
            what,
            detail,
            at,
        } => {
            conn.prepare_cached(
                "INSERT INTO events (sweep_id, at, key, what, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![sweep, at, key, what, detail])?;
            Ok(())
        }
    }
}

fn started(
    conn: &rusqlite::Connection,
    key: &str,
    host: Option<&str>,
    job_id: Option<&str>,
    at: f64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE stages SET status='running', started_at=?2, host=COALESCE(?3, host), job_id=?4, error=NULL
         WHERE key=?1",
    )?
    .execute(params![key, at, host, job_id])?;
    Ok(())
}

fn ended(
    conn: &rusqlite::Connection,
    key: &str,
    status: &str,
    error: Option<&str>,
    wall_s: Option<f64>,
    at: f64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE stages SET status=?2, error=?3, finished_at=?4, wall_s=COALESCE(?5, wall_s) WHERE key=?1",
    )?
    .execute(params![key, status, error, at, wall_s])?;
    Ok(())
}

/// A completed stage's rows (within the caller's transaction).
fn ingest(tx: &rusqlite::Connection, out: &crate::cache::StageOutputs) -> rusqlite::Result<()> {
    let m = &out.manifest;
    tx.prepare_cached(
        "UPDATE stages SET status='done', error=NULL, host=?2, started_at=?3, finished_at=?4, wall_s=?5, cpu_s=?6,
         peak_rss_kb=?7, trainable_params=?8, total_params=?9, log_path=?10 WHERE key=?1",
    )?
    .execute(params![
        m.key,
        m.host,
        m.started_at,
        m.finished_at,
        m.wall_s,
        m.cpu_s,
        m.peak_rss_kb.map(|v| v as i64),
        m.trainable_params.map(|v| v as i64),
        m.total_params.map(|v| v as i64),
        out.log_path.as_ref().map(|p| p.display().to_string()),
    ])?;
    for table in ["metrics", "curves", "captions"] {
        tx.prepare_cached(&format!("DELETE FROM {table} WHERE stage_key = ?1"))?
            .execute([&m.key])?;
    }
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO metrics (stage_key, split, metric, value) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (split, metric, value) in &out.metrics {
        if value.is_finite() {
            ins.execute(params![m.key, split, metric, value])?;
        }
    }
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO curves (stage_key, step, name, value) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (step, name, value) in &out.curves {
        if value.is_finite() {
            ins.execute(params![m.key, *step as i64, name, value])?;
        }
    }
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO captions (stage_key, split, image_id, caption, scores)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for c in &out.captions {
        ins.execute(params![
            m.key,
            c.split,
            c.image_id,
            c.caption,
            c.scores.as_ref().map(|s| s.to_string())
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Manifest, StageOutputs};

    fn stage(key: &str) -> StageRow {
        StageRow {
            key: key.into(),
            kind: "evaluate".into(),
            label: format!("evaluate {key}"),
            params: serde_json::json!({}),
            inputs: Vec::new(),
            reused: false,
        }
    }

    fn sweep() -> SweepRow {
        SweepRow {
            name: "t".into(),
            spec_path: "t.toml".into(),
            spec_text: String::new(),
            sets: Vec::new(),
            spec_hash: "h".into(),
            axes: Vec::new(),
            data_dir: "d".into(),
            data_digest: "g".into(),
            executor: "local".into(),
            jobs: 1,
            git_commit: None,
            host: None,
        }
    }

    fn outputs(key: &str) -> StageOutputs {
        StageOutputs {
            manifest: Manifest {
                key: key.into(),
                kind: "evaluate".into(),
                label: String::new(),
                params: serde_json::json!({}),
                inputs: Vec::new(),
                kind_version: 1,
                ecic_version: String::new(),
                data_digest: String::new(),
                seed: 0,
                started_at: 10.0,
                finished_at: 12.5,
                wall_s: 2.5,
                cpu_s: Some(2.0),
                peak_rss_kb: None,
                git_commit: None,
                host: Some("h1".into()),
                threads: 1,
                trainable_params: None,
                total_params: None,
                files: Vec::new(),
                digests: Default::default(),
            },
            metrics: vec![
                ("valid".into(), "cider_d".into(), 0.25),
                ("valid".into(), "bleu4".into(), f64::NAN),
            ],
            curves: vec![(1, "loss".into(), 3.0), (2, "loss".into(), 2.0)],
            captions: Vec::new(),
            log_path: None,
        }
    }

    fn row(store: &Store, key: &str) -> (String, Option<f64>, Option<f64>, Option<String>) {
        store
            .conn()
            .query_row(
                "SELECT status, started_at, finished_at, error FROM stages WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap()
    }

    fn count(store: &Store, sql: &str) -> i64 {
        store.conn().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_batch_records_each_op_with_its_own_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store
            .begin_sweep(&sweep(), &[], &[stage("a"), stage("b"), stage("c")])
            .unwrap();
        let ops = vec![
            StoreOp::Started {
                key: "a".into(),
                host: None,
                job_id: None,
                at: 1.0,
            },
            StoreOp::Started {
                key: "b".into(),
                host: None,
                job_id: Some("7".into()),
                at: 2.0,
            },
            StoreOp::Ingest(Box::new(outputs("a"))),
            StoreOp::Ended {
                key: "b".into(),
                status: "failed".into(),
                error: Some("boom".into()),
                wall_s: Some(1.0),
                at: 3.0,
            },
        ];
        assert!(store.apply(&ops).is_empty());
        // The manifest's times win over the event's for a completed stage.
        assert_eq!(
            row(&store, "a"),
            ("done".into(), Some(10.0), Some(12.5), None)
        );
        assert_eq!(
            row(&store, "b"),
            ("failed".into(), Some(2.0), Some(3.0), Some("boom".into()))
        );
        assert_eq!(row(&store, "c"), ("planned".into(), None, None, None));
        // Non-finite values are left out; re-ingesting replaces.
        assert!(store.apply(&ops[2..3]).is_empty());
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM metrics WHERE stage_key='a'"),
            1
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM curves WHERE stage_key='a'"),
            2
        );
    }

    #[test]
    fn a_failing_op_costs_only_its_own_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store
            .begin_sweep(&sweep(), &[], &[stage("a"), stage("b")])
            .unwrap();
        // Make every ingestion fail (its curves cannot be written).
        store.conn().execute_batch("DROP TABLE curves").unwrap();
        let ops = vec![
            StoreOp::Started {
                key: "a".into(),
                host: None,
                job_id: None,
                at: 1.0,
            },
            StoreOp::Ingest(Box::new(outputs("b"))),
            StoreOp::Ended {
                key: "a".into(),
                status: "interrupted".into(),
                error: None,
                wall_s: None,
                at: 4.0,
            },
        ];
        let errors = store.apply(&ops);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("curves"), "{}", errors[0]);
        assert_eq!(
            row(&store, "a"),
            ("interrupted".into(), Some(1.0), Some(4.0), None)
        );
        // The failed ingestion left nothing half-written.
        assert_eq!(row(&store, "b"), ("planned".into(), None, None, None));
        assert_eq!(count(&store, "SELECT COUNT(*) FROM metrics"), 0);
    }
}
