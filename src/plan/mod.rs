//! Plans: cells -> stage descriptions with cache keys -> one shared DAG.
//!
//! A [`Plan<Building>`] takes cells one at a time; stages with identical keys
//! are one node, which is how cells share work (one pretrain-align serves every
//! PEFT variant of a backbone x fusion pair). [`Plan::seal`] checks the graph
//! is acyclic and fixes a topological order; only a sealed plan can be run or
//! printed.

mod fingerprint;
pub mod kind;
mod render;

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
    pub stages: Vec<(StageKind, String)>,
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

    /// Add a cell's chain of stages, sharing nodes whose keys already exist.
    pub fn add_cell(&mut self, cell: &Cell) {
        let cell_idx = self.cells.len();
        let mut stages = Vec::new();
        let mut prev: Option<(StageKind, String)> = None;
        let mut preprocess: Option<String> = None;
        for kind in kind::chain(cell) {
            let mut inputs: Vec<(StageKind, String)> = prev.iter().cloned().collect();
            if kind == StageKind::Evaluate && !cell.is_baseline() {
                if let Some(p) = &preprocess {
                    inputs.push((StageKind::Preprocess, p.clone()));
                }
            }
            let fp = Fingerprint {
                kind: kind.name().to_string(),
                version: kind.version(),
                params: kind::params(kind, cell),
                inputs: inputs.iter().map(|(_, k)| k.clone()).collect(),
                data_digest: self.data_digest.clone(),
                seed: cell.seed,
            };
            let key = fp.key();
            let node = match self.index.get(&key) {
                Some(&n) => n,
                None => {
                    let label = label(kind, cell);
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
            if kind == StageKind::Preprocess {
                preprocess = Some(key.clone());
            }
            stages.push((kind, key.clone()));
            prev = Some((kind, key));
        }
        self.cells.push(CellPlan {
            cell: cell.clone(),
            stages,
        });
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

    /// Direct upstream keys of a stage.
    pub fn inputs_of(&self, key: &str) -> Vec<String> {
        self.get(key)
            .map(|n| n.desc.inputs.iter().map(|(_, k)| k.clone()).collect())
            .unwrap_or_default()
    }

    /// All stages downstream of `key` (not including it).
    pub fn dependents(&self, key: &str) -> Vec<String> {
        let Some(&start) = self.index.get(key) else {
            return Vec::new();
        };
        let mut dfs = petgraph::visit::Dfs::new(&self.graph, start);
        let mut out = Vec::new();
        while let Some(n) = dfs.next(&self.graph) {
            if n != start {
                out.push(self.graph[n].desc.key.clone());
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
        _ if cell.is_baseline() => cell.backbone.clone(),
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
