//! Plans: cells -> stage descriptions with cache keys -> one shared DAG.
//!
//! A [`Plan<Building>`] takes cells one at a time; stages with identical keys
//! are one node, which is how cells share work (one pretrain-align serves every
//! PEFT variant of a backbone x fusion pair, and the zero-shot cell of that pair
//! evaluates it as it is). [`Plan::seal`] checks the graph
//! is acyclic and fixes a topological order; only a sealed plan can be run or
//! printed. Under `[search.asha]` a trial's budgeted stage and those after
//! it are planned once per rung ([`rungs`]); the sweep runs the rungs it
//! promotes into, not the whole plan.

mod fingerprint;
pub mod kind;
mod render;
pub mod rungs;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use crate::exec::Resources;
use crate::spec::{Cell, Spec};

pub use fingerprint::{canonical, hash_value, Fingerprint};
pub use kind::StageKind;
pub use render::Format;

/// Everything `run-stage` needs to compute a stage, written to
/// `runs/stages/<key>.json` before it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageDesc {
    pub key: String,
    pub kind: StageKind,
    pub fingerprint: Fingerprint,
    /// Inputs in order: (kind, key).
    pub inputs: Vec<(StageKind, String)>,
    /// The data directory (absolute).
    pub data_dir: PathBuf,
    /// A short human label.
    pub label: String,
}

/// One node of the plan.
#[derive(Debug, Clone)]
pub struct StageNode {
    pub desc: StageDesc,
    /// Indices (into `Plan::cells`) of the cells that use this stage.
    pub cells: Vec<usize>,
    pub resources: Resources,
}

/// A cell and the keys of its stages, in pipeline order.
#[derive(Debug, Clone)]
pub struct CellPlan {
    pub cell: Cell,
    /// With successive halving, the chain ends in the top rung's stages.
    pub stages: Vec<(StageKind, String)>,
    /// A search trial under `[search.asha]`: every rung's stages (the
    /// budgeted stage and those after it), lowest budget first. Empty
    /// otherwise.
    pub rungs: Vec<rungs::RungPlan>,
}

/// Where a cell's chain has got to while its stages are added.
#[derive(Debug, Clone, Default)]
struct Chain {
    prev: Option<(StageKind, String)>,
    preprocess: Option<String>,
    foundations: Vec<(StageKind, String)>,
    /// (rung, steps) once the chain is inside a rung.
    rung: Option<(usize, u64)>,
}

pub struct Building;
pub struct Sealed;

pub struct Plan<S> {
    graph: DiGraph<StageNode, ()>,
    index: HashMap<String, NodeIndex>,
    pub cells: Vec<CellPlan>,
    order: Vec<NodeIndex>,
    data_dir: PathBuf,
    data_digest: String,
    _state: PhantomData<S>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the stage graph has a cycle through {0}")]
    Cycle(String),
}

impl Plan<Building> {
    pub fn new(data_dir: PathBuf, data_digest: String) -> Self {
        Plan {
            graph: DiGraph::new(),
            index: HashMap::new(),
            cells: Vec::new(),
            order: Vec::new(),
            data_dir,
            data_digest,
            _state: PhantomData,
        }
    }

    /// Add a cell's stages, sharing nodes whose keys already exist (see
    /// [`Plan::chain_node`] for what each stage reads). A search trial under
    /// `[search.asha]` gets, from its budgeted stage on, one chain per rung
    /// ([`rungs`]): every rung shares the stages above the budgeted one.
    pub fn add_cell(&mut self, cell: &Cell) {
        let cell_idx = self.cells.len();
        let mut stages = Vec::new();
        let foundation_seed = cell.config.foundation.seed;
        let foundation_pre = kind::has_foundations(cell).then(|| {
            let params = kind::foundation_preprocess_params(cell);
            let size = params["image_size"].clone();
            self.node(
                cell_idx,
                cell,
                StageKind::Preprocess,
                params,
                Vec::new(),
                foundation_seed,
                format!("preprocess foundation {size}px"),
            )
        });
        let chain = kind::chain(cell);
        let asha = rungs::of(cell, &chain);
        let split = asha
            .as_ref()
            .and_then(|a| chain.iter().position(|&k| k == a.kind))
            .unwrap_or(chain.len());
        let mut at = Chain::default();
        for &kind in &chain[..split] {
            let key = self.chain_node(cell_idx, cell, kind, &mut at, &foundation_pre, None);
            stages.push((kind, key));
        }
        let mut rung_plans = Vec::new();
        if let Some(a) = &asha {
            let mut lower: Option<String> = None;
            for (r, &steps) in a.budgets.iter().enumerate() {
                let mut here = at.clone();
                let mut rung_stages = Vec::new();
                for &kind in &chain[split..] {
                    let budget = (kind == a.kind).then(|| rungs::Budget {
                        rung: r,
                        steps,
                        max_steps: a.max_steps,
                        lower: lower.clone(),
                    });
                    let key =
                        self.chain_node(cell_idx, cell, kind, &mut here, &foundation_pre, budget);
                    if kind == a.kind {
                        lower = Some(key.clone());
                    }
                    rung_stages.push((kind, key));
                }
                rung_plans.push(rungs::RungPlan {
                    steps,
                    stages: rung_stages,
                });
            }
            // The cell's own chain ends in its top rung: the full budget.
            stages.extend(rung_plans.last().expect("at least one rung").stages.clone());
        }
        self.cells.push(CellPlan {
            cell: cell.clone(),
            stages,
            rungs: rung_plans,
        });
    }

    /// Add the chain's next stage, `kind`, for `cell`, after the chain so far
    /// (`at`, advanced here). Each stage reads the one before it in the
    /// chain, except: the foundation stages read their own preprocess node
    /// (`foundation_pre`), pretrain-align reads the cell's preprocess and both
    /// foundations, and evaluate also reads the cell's preprocess. A rung of
    /// the budgeted stage (`budget`) also reads the rung below it.
    fn chain_node(
        &mut self,
        cell_idx: usize,
        cell: &Cell,
        kind: StageKind,
        at: &mut Chain,
        foundation_pre: &Option<String>,
        budget: Option<rungs::Budget>,
    ) -> String {
        let foundation_seed = cell.config.foundation.seed;
        let (mut inputs, seed) = match kind {
            StageKind::PretrainVision | StageKind::PretrainLm => {
                let pre = foundation_pre.clone().expect("chain has foundations");
                (vec![(StageKind::Preprocess, pre)], foundation_seed)
            }
            StageKind::PretrainAlign => {
                let mut v: Vec<(StageKind, String)> = at
                    .preprocess
                    .iter()
                    .map(|p| (StageKind::Preprocess, p.clone()))
                    .collect();
                v.extend(at.foundations.iter().cloned());
                (v, cell.seed)
            }
            StageKind::Evaluate if !cell.is_baseline() => {
                // A zero-shot cell on a whole checkpoint has no model stage before
                // evaluate: its one input is then the preprocess entry.
                let mut v: Vec<(StageKind, String)> = at
                    .prev
                    .iter()
                    .filter(|(k, _)| *k != StageKind::Preprocess)
                    .cloned()
                    .collect();
                v.extend(
                    at.preprocess
                        .iter()
                        .map(|p| (StageKind::Preprocess, p.clone())),
                );
                (v, cell.seed)
            }
            _ => (at.prev.iter().cloned().collect(), cell.seed),
        };
        let mut params = kind::params(kind, cell);
        let mut label = label(kind, cell);
        if let Some(b) = &budget {
            rungs::budget_params(kind, &mut params, b);
            if let Some(lower) = &b.lower {
                inputs.push((kind, lower.clone()));
            }
        }
        if let Some(r) = at.rung.or(budget.as_ref().map(|b| (b.rung, b.steps))) {
            label.push_str(&format!(" r{}@{}", r.0, r.1));
            at.rung = Some(r);
        }
        let key = self.node(cell_idx, cell, kind, params, inputs, seed, label);
        match kind {
            StageKind::Preprocess => at.preprocess = Some(key.clone()),
            StageKind::PretrainVision | StageKind::PretrainLm => {
                at.foundations.push((kind, key.clone()))
            }
            _ => {}
        }
        // The foundation stages hang off their own preprocess: the next stage of the
        // chain (pretrain-align) names its inputs itself.
        at.prev = Some((kind, key.clone()));
        key
    }

    /// The node with this description's key (added if new), used by cell `cell_idx`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call per stage, each argument a different part of the key"
    )]
    fn node(
        &mut self,
        cell_idx: usize,
        cell: &Cell,
        kind: StageKind,
        params: serde_json::Value,
        inputs: Vec<(StageKind, String)>,
        seed: u64,
        label: String,
    ) -> String {
        let fp = Fingerprint {
            kind: kind.name().to_string(),
            version: kind.version(),
            params,
            inputs: inputs.iter().map(|(_, k)| k.clone()).collect(),
            data_digest: self.data_digest.clone(),
            seed,
        };
        let key = fp.key();
        let node = match self.index.get(&key) {
            Some(&n) => n,
            None => {
                let desc = StageDesc {
                    key: key.clone(),
                    kind,
                    fingerprint: fp,
                    inputs: inputs.clone(),
                    data_dir: self.data_dir.clone(),
                    label,
                };
                let resources = cell
                    .config
                    .resources
                    .get(kind.spec_name())
                    .cloned()
                    .unwrap_or_default();
                let n = self.graph.add_node(StageNode {
                    desc,
                    cells: Vec::new(),
                    resources,
                });
                for (_, input) in &inputs {
                    let from = self.index[input];
                    // A new node: its input edges cannot exist yet.
                    self.graph.add_edge(from, n, ());
                }
                self.index.insert(key.clone(), n);
                n
            }
        };
        let cells = &mut self.graph[node].cells;
        if cells.last() != Some(&cell_idx) {
            cells.push(cell_idx);
        }
        key
    }

    /// Check the graph is acyclic and fix the run order.
    pub fn seal(self) -> Result<Plan<Sealed>, PlanError> {
        let order = petgraph::algo::toposort(&self.graph, None)
            .map_err(|c| PlanError::Cycle(self.graph[c.node_id()].desc.label.clone()))?;
        Ok(Plan {
            graph: self.graph,
            index: self.index,
            cells: self.cells,
            order,
            data_dir: self.data_dir,
            data_digest: self.data_digest,
            _state: PhantomData,
        })
    }
}

impl Plan<Sealed> {
    /// Build and seal the plan of a whole spec.
    pub fn of_spec(spec: &Spec, data_dir: PathBuf, data_digest: String) -> Result<Self, PlanError> {
        let mut p = Plan::new(data_dir, data_digest);
        for cell in &spec.cells {
            p.add_cell(cell);
        }
        p.seal()
    }

    /// Stages in a topological order.
    pub fn stages(&self) -> impl Iterator<Item = &StageNode> + '_ {
        self.order.iter().map(|&i| &self.graph[i])
    }

    pub fn get(&self, key: &str) -> Option<&StageNode> {
        self.index.get(key).map(|&i| &self.graph[i])
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Stage count if no cell shared anything.
    pub fn naive_len(&self) -> usize {
        self.cells.iter().map(|c| c.stages.len()).sum()
    }

    pub fn data_digest(&self) -> &str {
        &self.data_digest
    }

    pub fn data_dir(&self) -> &PathBuf {
        &self.data_dir
    }

    /// Every stage upstream of `key` (not including it), nearest first: a
    /// stage reads entries further up than its direct inputs (a model
    /// lineage's weights, the preprocessed data).
    pub fn ancestors(&self, key: &str) -> Vec<&StageNode> {
        let Some(&start) = self.index.get(key) else {
            return Vec::new();
        };
        let up = petgraph::visit::Reversed(&self.graph);
        let mut bfs = petgraph::visit::Bfs::new(up, start);
        let mut out = Vec::new();
        while let Some(n) = bfs.next(up) {
            if n != start {
                out.push(&self.graph[n]);
            }
        }
        out
    }
}

fn label(kind: StageKind, cell: &Cell) -> String {
    let what = match kind {
        StageKind::Preprocess => {
            format!("{}px", kind::params(kind, cell)["image_size"])
        }
        StageKind::PretrainAlign => format!("{}/{}", cell.backbone, cell.fusion),
        // Shared by every backbone of a preset: named by the preset, not the cell.
        StageKind::PretrainVision | StageKind::PretrainLm => {
            let c = &cell.config;
            return format!(
                "{} {}{} s{}",
                kind.name(),
                c.model.preset,
                // The stem is the tower's; the LM does not depend on it.
                if c.model.stem == "patch" || kind == StageKind::PretrainLm {
                    String::new()
                } else {
                    format!(" {}", c.model.stem)
                },
                c.foundation.seed
            );
        }
        _ if cell.is_baseline() => cell.backbone.clone(),
        _ if cell.is_zero_shot() => format!("{}/zero-shot/{}", cell.backbone, cell.fusion),
        _ => format!("{}/{}/{}", cell.backbone, cell.peft, cell.fusion),
    };
    let mut extra = String::new();
    for (axis, v) in &cell.overrides {
        let short = axis.rsplit('.').next().unwrap_or(axis);
        extra.push_str(&format!(
            " {short}={}",
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        ));
    }
    format!("{} {what}{extra} s{}", kind.name(), cell.seed)
}
