//! The schema, as an ordered list of migrations applied in place.
//!
//! `PRAGMA user_version` records how many migrations a database has seen; opening
//! a database applies the rest in one transaction. Never edit a migration that
//! has landed: append a new one. `docs/store.md` documents the tables.

pub const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
CREATE TABLE sweeps (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,      -- the spec's `name`
    spec_path     TEXT NOT NULL,
    spec_text     TEXT NOT NULL,             -- the spec file as read
    sets          TEXT NOT NULL DEFAULT '[]',-- --set overrides (JSON list)
    spec_hash     TEXT NOT NULL,
    axes          TEXT NOT NULL DEFAULT '[]',-- grid axis names (JSON list)
    data_dir      TEXT NOT NULL,
    data_digest   TEXT NOT NULL,
    executor      TEXT NOT NULL,
    jobs          INTEGER NOT NULL,
    git_commit    TEXT,
    host          TEXT,
    ecic_version  TEXT NOT NULL,
    started_at    REAL NOT NULL,             -- unix seconds
    finished_at   REAL,
    status        TEXT NOT NULL              -- running | done | failed | interrupted
);
CREATE TABLE cells (
    id        INTEGER PRIMARY KEY,
    sweep_id  INTEGER NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
    name      TEXT NOT NULL,
    backbone  TEXT NOT NULL,
    peft      TEXT NOT NULL,
    fusion    TEXT NOT NULL,
    seed      INTEGER NOT NULL,
    overrides TEXT NOT NULL DEFAULT '{}',    -- non-named axis values (JSON object)
    position  INTEGER NOT NULL,              -- order in the grid
    UNIQUE (sweep_id, name)
);
CREATE TABLE stages (
    key            TEXT PRIMARY KEY,         -- the cache key (hex)
    kind           TEXT NOT NULL,
    label          TEXT NOT NULL,
    params         TEXT NOT NULL,            -- the resolved parameters (JSON)
    inputs         TEXT NOT NULL,            -- input keys (JSON list)
    status         TEXT NOT NULL,            -- planned | running | done | failed | skipped | interrupted
    error          TEXT,
    host           TEXT,
    job_id         TEXT,
    started_at     REAL,
    finished_at    REAL,
    wall_s         REAL,
    cpu_s          REAL,
    peak_rss_kb    INTEGER,
    trainable_params INTEGER,
    total_params   INTEGER,
    log_path       TEXT
);
CREATE TABLE sweep_stages (
    sweep_id  INTEGER NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    reused    INTEGER NOT NULL DEFAULT 0,    -- 1 if found complete in the cache
    PRIMARY KEY (sweep_id, key)
);
CREATE TABLE cell_stages (
    cell_id   INTEGER NOT NULL REFERENCES cells(id) ON DELETE CASCADE,
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    PRIMARY KEY (cell_id, kind)
);
CREATE INDEX cell_stages_key ON cell_stages(key);
CREATE TABLE metrics (
    stage_key TEXT NOT NULL,
    split     TEXT NOT NULL,                 -- valid | test | train | '' (stage-level)
    metric    TEXT NOT NULL,
    value     REAL NOT NULL,
    PRIMARY KEY (stage_key, split, metric)
);
CREATE TABLE curves (
    stage_key TEXT NOT NULL,
    step      INTEGER NOT NULL,
    name      TEXT NOT NULL,                 -- loss | lr | grad_norm | reward | val_loss | samples_per_s
    value     REAL NOT NULL,
    PRIMARY KEY (stage_key, name, step)
);
CREATE TABLE captions (
    stage_key TEXT NOT NULL,
    split     TEXT NOT NULL,
    image_id  TEXT NOT NULL,
    caption   TEXT NOT NULL,
    scores    TEXT,                          -- per-image score record (JSON), when references exist
    PRIMARY KEY (stage_key, split, image_id)
);
CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    sweep_id  INTEGER REFERENCES sweeps(id) ON DELETE CASCADE,
    at        REAL NOT NULL,
    key       TEXT,
    what      TEXT NOT NULL,
    detail    TEXT
);
CREATE VIEW results AS
SELECT sw.name AS sweep, c.name AS cell, c.backbone, c.peft, c.fusion, c.seed,
       cs.kind AS stage, m.split, m.metric, m.value
FROM cells c
JOIN sweeps sw ON sw.id = c.sweep_id
JOIN cell_stages cs ON cs.cell_id = c.id
JOIN metrics m ON m.stage_key = cs.key;
"#,
    // 2: sweep revisions. A sweep name run again with another spec, other
    // overrides or other data adds a row (revision + 1) instead of replacing
    // the recorded one, so `name` is no longer unique. SQLite cannot drop a
    // constraint: the table is rebuilt (with foreign keys off, see
    // `Store::migrate`). `results` shows the latest revision of each name;
    // `results_all` every revision.
    r#"
DROP VIEW results;
CREATE TABLE sweeps_new (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,             -- the spec's `name`
    revision      INTEGER NOT NULL DEFAULT 1,-- 1, 2, ... per name
    spec_path     TEXT NOT NULL,
    spec_text     TEXT NOT NULL,
    sets          TEXT NOT NULL DEFAULT '[]',
    spec_hash     TEXT NOT NULL,
    axes          TEXT NOT NULL DEFAULT '[]',
    data_dir      TEXT NOT NULL,
    data_digest   TEXT NOT NULL,
    executor      TEXT NOT NULL,
    jobs          INTEGER NOT NULL,
    git_commit    TEXT,
    host          TEXT,
    ecic_version  TEXT NOT NULL,
    started_at    REAL NOT NULL,
    finished_at   REAL,
    status        TEXT NOT NULL,
    UNIQUE (name, revision)
);
INSERT INTO sweeps_new (id, name, revision, spec_path, spec_text, sets, spec_hash, axes, data_dir,
    data_digest, executor, jobs, git_commit, host, ecic_version, started_at, finished_at, status)
SELECT id, name, 1, spec_path, spec_text, sets, spec_hash, axes, data_dir, data_digest, executor, jobs,
    git_commit, host, ecic_version, started_at, finished_at, status FROM sweeps;
DROP TABLE sweeps;
ALTER TABLE sweeps_new RENAME TO sweeps;
CREATE VIEW results AS
SELECT sw.name AS sweep, c.name AS cell, c.backbone, c.peft, c.fusion, c.seed,
       cs.kind AS stage, m.split, m.metric, m.value
FROM cells c
JOIN sweeps sw ON sw.id = c.sweep_id
JOIN cell_stages cs ON cs.cell_id = c.id
JOIN metrics m ON m.stage_key = cs.key
WHERE sw.revision = (SELECT MAX(s2.revision) FROM sweeps s2 WHERE s2.name = sw.name);
CREATE VIEW results_all AS
SELECT sw.name AS sweep, sw.revision, c.name AS cell, c.backbone, c.peft, c.fusion, c.seed,
       cs.kind AS stage, m.split, m.metric, m.value
FROM cells c
JOIN sweeps sw ON sw.id = c.sweep_id
JOIN cell_stages cs ON cs.cell_id = c.id
JOIN metrics m ON m.stage_key = cs.key;
"#,
];
