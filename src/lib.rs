//! ecic: ablation sweeps for e-commerce image captioning.
//!
//! # Architecture
//!
//! A researcher's TOML spec flows through the tree in the order of the modules
//! below:
//!
//! - [`spec`]: raw TOML (figment) -> validated spec -> expanded grid cells.
//! - [`plan`]: stage descriptions, cache keys (fingerprints), the sealed DAG.
//! - [`cache`]: content-addressed stage outputs, atomic publish, locks.
//! - [`exec`]: the executor seam (local, slurm) and run events.
//! - [`store`]: SQLite: schema, migrations, writes, queries, the `results` view.
//! - [`data`]: MUGE reader/writer, synthetic data, preprocessing, tokenizer.
//! - [`model`]: the linear seam (plain / LoRA / QLoRA / adapter), ViT, LM,
//!   Q-Former, fusion, backbones.
//! - [`train`]: training loop, schedules, checkpoints, SCST.
//! - [`decode`]: greedy, beam, nucleus.
//! - [`metrics`]: tokenization, BLEU, ROUGE-L, CIDEr-D, bootstrap.
//! - [`stages`]: one file per stage kind, each a short composition of the above.
//! - [`report`]: terminal tables, plots, HTML.
//! - [`infer`]: after the sweep: a recorded cell, an export or a checkpoint loaded for
//!   captioning (`ecic predict`), written as a self-contained directory (`ecic export`).
//! - [`serve`]: such a model behind HTTP, with dynamic batching (`ecic serve`).
//! - [`sweep`]: one call that prepares a spec's plan and runs it (cache
//!   check, store records, the scheduler and an executor, summary, report);
//!   the command line's `sweep` and `plan` are thin wrappers around it.
//!
//! Dependencies point one way: `stages` uses `model/train/data/metrics`;
//! `plan/exec/cache/store` know stages only through one description
//! ([`plan::StageDesc`]) and one enum ([`plan::StageKind`]), and run them
//! through one function ([`stages::run_stage`]); `report` reads `store`.
//! Nothing below imports [`cli`].

pub mod alloc;
pub mod cache;
pub mod cli;
pub mod data;
pub mod decode;
pub mod error;
pub mod exec;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod report;
pub mod runtime;
pub mod serve;
pub mod spec;
pub mod stages;
pub mod store;
pub mod sweep;
pub mod train;

pub use error::{CliError, CliResult};
