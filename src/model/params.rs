//! The parameter store and the builder every module is constructed through.
//!
//! Each tensor is named like a checkpoint key (`lm.layers.0.qkv_proj.weight`), tagged with the
//! component it belongs to, and initialised deterministically from `(seed, name)`, so building
//! the same config twice gives the same weights whatever the construction order. A trainable
//! tensor is a `Var`; a frozen one is a plain tensor and never enters the gradient store. A
//! QLoRA base holds its linears' weights in Q4_0 and its token-embedding table in bf16 where
//! every value is exactly bf16 (a bf16 checkpoint's table), which keeps the values unchanged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{PeftConfig, PeftMethod, Phase, VisionPolicy};
use super::ModelError;

/// Which part of the model a tensor belongs to (per-group learning rates key on this).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Vision,
    /// Q-Former, projectors, separator tokens, level pooling, cross-attention layers.
    Connector,
    Lm,
    /// PEFT parameters: LoRA A/B and bottleneck adapters.
    Adapter,
}

/// How a fresh tensor is initialised.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    Zeros,
    Ones,
    Normal(f32),
    Uniform(f32),
}

/// The 4-bit format of QLoRA's frozen base.
const QUANT: GgmlDType = GgmlDType::Q4_0;

#[derive(Debug, Clone)]
pub(crate) enum Slot {
    Var(Var),
    Const(Tensor),
    /// A frozen base weight held only in 4-bit form (QLoRA); the f32 copy is dropped.
    Quant(Arc<QTensor>),
    /// A frozen lookup table of a QLoRA base held in bf16 because every one of its values is
    /// exactly a bf16 value (a bf16 checkpoint's are): half the bytes, the same values
    /// ([`Builder::base_lookup`]).
    Half(Tensor),
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub slot: Slot,
    pub component: Component,
    /// Part of the base the align checkpoint holds (false: PEFT parameter).
    pub base: bool,
    pub decay: bool,
}

impl Entry {
    /// The f32 value (a quantized entry is dequantized).
    pub fn tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        match &self.slot {
            Slot::Var(v) => Ok(v.as_tensor().clone()),
            Slot::Const(t) => Ok(t.clone()),
            Slot::Quant(q) => q.dequantize(device),
            Slot::Half(t) => t.to_dtype(DType::F32),
        }
    }

    pub fn elem_count(&self) -> usize {
        match &self.slot {
            Slot::Var(v) => v.elem_count(),
            Slot::Const(t) | Slot::Half(t) => t.elem_count(),
            Slot::Quant(q) => q.shape().elem_count(),
        }
    }

    /// Bytes this entry occupies as stored.
    pub fn bytes(&self) -> usize {
        match &self.slot {
            Slot::Quant(q) => q.storage_size_in_bytes(),
            Slot::Half(t) => 2 * t.elem_count(),
            _ => 4 * self.elem_count(),
        }
    }

    /// Replaces the value with `t` (f32, the entry's shape): a trainable entry is set in place,
    /// a 4-bit entry is quantized at once (so a frozen QLoRA base is never held in f32 beyond
    /// the one tensor being loaded), any other becomes a constant. A rebuild of the model picks
    /// the new value up.
    pub fn set(&mut self, t: Tensor) -> candle_core::Result<()> {
        match &self.slot {
            Slot::Var(v) => v.set(&t)?,
            Slot::Quant(_) => {
                self.slot = Slot::Quant(Arc::new(QTensor::quantize(&t, QUANT)?));
            }
            // Held in f32 until the rebuild checks it again (`Builder::base_lookup`).
            Slot::Const(_) | Slot::Half(_) => self.slot = Slot::Const(t),
        }
        Ok(())
    }

    /// The entry's shape.
    pub fn dims(&self) -> Vec<usize> {
        match &self.slot {
            Slot::Var(v) => v.dims().to_vec(),
            Slot::Const(c) | Slot::Half(c) => c.dims().to_vec(),
            Slot::Quant(q) => q.shape().dims().to_vec(),
        }
    }

    pub fn var(&self) -> Option<&Var> {
        match &self.slot {
            Slot::Var(v) => Some(v),
            _ => None,
        }
    }
}

/// All named tensors of one model, plus the bytes of the quantized copies the factory made.
#[derive(Debug)]
pub(crate) struct ParamStore {
    pub entries: BTreeMap<String, Entry>,
    pub device: Device,
    pub seed: u64,
}

impl ParamStore {
    pub fn new(device: &Device, seed: u64) -> Self {
        Self {
            entries: BTreeMap::new(),
            device: device.clone(),
            seed,
        }
    }

    /// A copy whose tensors are detached constants sharing storage (no autograd recording).
    pub fn detached(&self) -> Self {
        let entries = self
            .entries
            .iter()
            .map(|(k, e)| {
                let slot = match &e.slot {
                    Slot::Var(v) => Slot::Const(v.as_tensor().detach()),
                    other => other.clone(),
                };
                (k.clone(), Entry { slot, ..e.clone() })
            })
            .collect();
        Self {
            entries,
            device: self.device.clone(),
            seed: self.seed,
        }
    }

    fn init(&self, name: &str, shape: &[usize], init: Init) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) | Init::Uniform(std) => {
                let mut h = blake3::Hasher::new();
                h.update(&self.seed.to_le_bytes());
                h.update(name.as_bytes());
                let mut rng = ChaCha8Rng::from_seed(*h.finalize().as_bytes());
                if let Init::Uniform(b) = init {
                    (0..n).map(|_| rng.gen_range(-b..b)).collect()
                } else {
                    (0..n)
                        .map(|_| {
                            // Box-Muller: rand 0.8 has no normal distribution without rand_distr.
                            let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
                            let u2: f32 = rng.gen();
                            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                        })
                        .collect()
                }
            }
        };
        Tensor::from_vec(data, shape, &self.device)
    }
}

/// Which tensors the current phase trains, and how linears are wrapped.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub phase: Phase,
    pub peft: PeftConfig,
    pub pretrained: bool,
    /// Inference build: everything constant, LoRA merged, no quantized forward.
    pub inference: bool,
    /// Base components `align` trains although they are pretrained.
    pub unfrozen: Vec<Component>,
}

impl Policy {
    pub fn base_trainable(&self, c: Component) -> bool {
        if self.inference {
            return false;
        }
        match (self.phase, c) {
            (_, Component::Connector) | (_, Component::Adapter) => true,
            (Phase::Align, c) => !self.pretrained || self.unfrozen.contains(&c),
            (Phase::Adapt, Component::Lm) => self.peft.method == PeftMethod::Full,
            (Phase::Adapt, Component::Vision) => false,
        }
    }

    /// Whether the base module at `prefix` (a builder path such as `lm.lm_head`) is one of the
    /// PEFT config's `modules_to_save`: trained in full during `adapt`, never quantized.
    pub fn saved(&self, c: Component, prefix: &str) -> bool {
        !self.inference
            && self.phase == Phase::Adapt
            && c == Component::Lm
            && prefix
                .split('.')
                .any(|seg| self.peft.modules_to_save.iter().any(|m| m == seg))
    }

    /// Whether the linear `target` of component `c` carries LoRA.
    pub fn lora(&self, c: Component, target: &str) -> bool {
        if self.phase != Phase::Adapt {
            return false;
        }
        match c {
            Component::Lm => {
                matches!(self.peft.method, PeftMethod::Lora | PeftMethod::Qlora)
                    && self.peft.targets.iter().any(|t| t == target)
            }
            Component::Vision => {
                self.peft.vision == VisionPolicy::Lora && matches!(target, "qkv" | "proj")
            }
            _ => false,
        }
    }

    pub fn quantize(&self, c: Component) -> bool {
        !self.inference
            && self.phase == Phase::Adapt
            && self.peft.method == PeftMethod::Qlora
            && matches!(c, Component::Lm | Component::Vision)
            && !self.base_trainable(c)
    }

    pub fn adapters(&self, c: Component) -> bool {
        self.phase == Phase::Adapt && self.peft.method == PeftMethod::Adapter && c == Component::Lm
    }
}

/// Whether every value of the f32 tensor `t` converts to bf16 and back unchanged.
fn exactly_bf16(t: &Tensor) -> candle_core::Result<bool> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(c) = &*s else {
        return Ok(false);
    };
    let v = super::fused::slice(c, l)?;
    Ok(v.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x))
}

/// A path-prefixed handle on the store, like candle's `VarBuilder`, that also carries the
/// component and the policy so the linear factory can decide how to wrap each layer.
pub(crate) struct Builder<'a> {
    pub store: &'a Mutex<ParamStore>,
    pub policy: &'a Policy,
    pub prefix: String,
    pub component: Component,
}

impl<'a> Builder<'a> {
    pub fn root(store: &'a Mutex<ParamStore>, policy: &'a Policy, component: Component) -> Self {
        Self {
            store,
            policy,
            prefix: String::new(),
            component,
        }
    }

    pub fn pp(&self, name: impl std::fmt::Display) -> Builder<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Builder {
            store: self.store,
            policy: self.policy,
            prefix,
            component: self.component,
        }
    }

    pub fn with_component(&self, component: Component) -> Builder<'a> {
        Builder {
            store: self.store,
            policy: self.policy,
            prefix: self.prefix.clone(),
            component,
        }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn device(&self) -> Device {
        self.lock().device.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'a, ParamStore> {
        // A poisoned lock only means another build panicked; the map itself is still sound.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A base tensor of this builder's component (trainable per the policy).
    pub fn base(
        &self,
        name: &str,
        shape: &[usize],
        init: Init,
        decay: bool,
    ) -> Result<Tensor, ModelError> {
        let trainable = self.policy.base_trainable(self.component)
            || self.policy.saved(self.component, &self.prefix);
        self.get(name, shape, init, self.component, true, trainable, decay)
    }

    /// A PEFT tensor (always trainable outside inference).
    pub fn peft(
        &self,
        name: &str,
        shape: &[usize],
        init: Init,
        decay: bool,
    ) -> Result<Tensor, ModelError> {
        self.get(
            name,
            shape,
            init,
            Component::Adapter,
            false,
            !self.policy.inference,
            decay,
        )
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "internal helper; the two public wrappers name the cases"
    )]
    fn get(
        &self,
        name: &str,
        shape: &[usize],
        init: Init,
        component: Component,
        base: bool,
        trainable: bool,
        decay: bool,
    ) -> Result<Tensor, ModelError> {
        let full = self.path(name);
        let mut store = self.lock();
        if let Some(e) = store.entries.get(&full) {
            // A bf16 table is handed out as held: only `base_lookup` builds on one.
            let t = match &e.slot {
                Slot::Half(t) => t.clone(),
                _ => e.tensor(&store.device)?,
            };
            if t.dims() != shape {
                return Err(ModelError::Shape {
                    name: full,
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            return Ok(t);
        }
        let t = store.init(&full, shape, init)?.to_dtype(DType::F32)?;
        let (slot, out) = if trainable {
            let v = Var::from_tensor(&t)?;
            let out = v.as_tensor().clone();
            (Slot::Var(v), out)
        } else {
            (Slot::Const(t.clone()), t)
        };
        store.entries.insert(
            full,
            Entry {
                slot,
                component,
                base,
                decay,
            },
        );
        Ok(out)
    }

    /// A base lookup table (token embeddings: rows are read, never multiplied whole), as
    /// [`Builder::base`] gives it, except in a QLoRA base where it is frozen and every value is
    /// exactly a bf16 value: then it is held in bf16 (checked on first use, or after a load
    /// replaced it with f32 values), and the caller converts the rows it reads. A real
    /// checkpoint's table is bf16 (260 MB instead of 520 MB f32 at 32k x 2k); the tiny presets'
    /// trained f32 tables are not, and stay as they were.
    pub fn base_lookup(
        &self,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> Result<Tensor, ModelError> {
        let t = self.base(name, shape, init, false)?;
        let frozen = self.policy.quantize(self.component)
            && !self.policy.saved(self.component, &self.prefix);
        if !frozen || t.dtype() != DType::F32 || !exactly_bf16(&t)? {
            return Ok(t);
        }
        let half = t.to_dtype(DType::BF16)?;
        if let Some(e) = self.lock().entries.get_mut(&self.path(name)) {
            e.slot = Slot::Half(half.clone());
        }
        Ok(half)
    }

    /// A frozen base weight kept only in Q4_0 form: quantized on first use (or after a base
    /// load replaced it with f32 values), reused as is afterwards.
    pub fn base_quantized(
        &self,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> Result<Arc<QTensor>, ModelError> {
        let full = self.path(name);
        if let Some(Slot::Quant(q)) = self.lock().entries.get(&full).map(|e| e.slot.clone()) {
            if q.shape().dims() != shape {
                return Err(ModelError::Shape {
                    name: full,
                    expected: shape.to_vec(),
                    found: q.shape().dims().to_vec(),
                });
            }
            return Ok(q);
        }
        let w = self.get(name, shape, init, self.component, true, false, true)?;
        let q = Arc::new(QTensor::quantize(&w, QUANT)?);
        if let Some(e) = self.lock().entries.get_mut(&full) {
            e.slot = Slot::Quant(q.clone());
        }
        Ok(q)
    }
}
