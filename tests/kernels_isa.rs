//! Every instruction-set level of the dispatched kernels (src/model/vmath.rs) gives the same
//! bits as baseline x86-64: the vectorised `exp` and reductions, the fused softmax / norms /
//! GELU / SwiGLU / RoPE / cross-entropy (values and gradients), self-attention and cached
//! attention, and Q4_0 dequantisation. The kernels never ask for fused multiply-adds and fix the
//! order of their sums, so equality is exact, not within a tolerance. Levels the CPU lacks are
//! skipped and named on stderr.
//!
//! Its own binary: the first test switches the process-wide level (the second gives the same
//! bits at every level, so it may run beside it).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor, Var};
use ecic::model::vmath::{self, Isa};
use ecic::model::{fused, kernels, ops, quant};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand(r: &mut ChaCha8Rng, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.gen_range(-scale..scale)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

/// `(y, dL/dx)` of `L = sum(f(x) * wy)` for a random `wy` of `y`'s shape.
fn value_and_grad(x: &Tensor, f: impl Fn(&Tensor) -> Tensor, seed: u64) -> [Vec<u32>; 2] {
    let xv = Var::from_tensor(x).unwrap();
    let y = f(xv.as_tensor());
    let wy = rand(&mut ChaCha8Rng::seed_from_u64(seed), y.dims(), 1.0);
    let g = y.mul(&wy).unwrap().sum_all().unwrap().backward().unwrap();
    [bits(&y), bits(g.get(xv.as_tensor()).unwrap())]
}

/// Every kernel's outputs, as bits, at the level the process runs now; the inputs are the same
/// at every call. Sizes cover vector tails (rows not a multiple of 8 or 16) and tensors large
/// enough for the rayon path of the fused ops (32k floats and more).
fn outputs() -> Vec<(&'static str, Vec<u32>)> {
    let mut r = ChaCha8Rng::seed_from_u64(21);
    let mut out: Vec<(&'static str, Vec<u32>)> = Vec::new();

    // vmath on its own, inside a dispatched body as the kernels call it
    let xs: Vec<f32> = (0..3003).map(|_| r.gen_range(-90.0..90.0)).collect();
    let ys: Vec<f32> = (0..3003).map(|_| r.gen_range(-2.0..2.0)).collect();
    let mut e = xs.clone();
    vmath::dispatch(|| vmath::exp_in_place(&mut e));
    out.push(("exp", e.iter().map(|v| v.to_bits()).collect()));
    let red = vmath::dispatch(|| {
        [
            vmath::sum(&ys),
            vmath::dot(&xs, &ys),
            vmath::dot3(&xs, &ys, &ys),
            vmath::sum_sq_dev(&ys, 0.25),
            vmath::max(&xs),
        ]
    });
    out.push(("reductions", red.iter().map(|v| v.to_bits()).collect()));

    for (name, dims) in [("small", [3usize, 5, 37]), ("large", [4, 96, 100])] {
        let x = rand(&mut r, &dims, 4.0);
        let n = dims[2];
        let mask = ops::causal_mask(dims[1], n.max(dims[1]), &Device::Cpu)
            .unwrap()
            .narrow(1, 0, n)
            .unwrap();
        let [y, g] = value_and_grad(&x, |x| fused::softmax(x, 0.3, Some(&mask)).unwrap(), 1);
        out.push((name, y));
        out.push(("softmax grad", g));
        let w = rand(&mut r, &[n], 1.0);
        let b = rand(&mut r, &[n], 1.0);
        let [y, g] = value_and_grad(&x, |x| fused::rms_norm(x, &w, 1e-5).unwrap(), 2);
        out.push(("rms_norm", y));
        out.push(("rms_norm grad", g));
        let [y, g] = value_and_grad(&x, |x| fused::layer_norm(x, &w, &b, 1e-5).unwrap(), 3);
        out.push(("layer_norm", y));
        out.push(("layer_norm grad", g));
        let [y, g] = value_and_grad(&x, |x| fused::gelu(x).unwrap(), 4);
        out.push(("gelu", y));
        out.push(("gelu grad", g));
        let even = x.narrow(2, 0, n / 2 * 2).unwrap();
        let [y, g] = value_and_grad(&even, |x| fused::swiglu(x).unwrap(), 5);
        out.push(("swiglu", y));
        out.push(("swiglu grad", g));
    }

    // norm weight gradients (summed over rows) through a trained weight
    let x = rand(&mut r, &[7, 130], 2.0);
    let wv = Var::from_tensor(&rand(&mut r, &[130], 1.0)).unwrap();
    let bv = Var::from_tensor(&rand(&mut r, &[130], 1.0)).unwrap();
    let y = fused::layer_norm(&x, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
    let rn = fused::rms_norm(&x, wv.as_tensor(), 1e-5).unwrap();
    let g = (y + rn)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    out.push(("norm weight grads", bits(g.get(wv.as_tensor()).unwrap())));
    out.push(("layer_norm bias grad", bits(g.get(bv.as_tensor()).unwrap())));

    // RoPE and attention
    let (bsz, t, heads, d) = (3, 11, 4, 24);
    let w = heads * d;
    let rope = ops::Rope::new(d, 32, 10_000.0, &Device::Cpu).unwrap();
    let (cos, sin) = rope.tables();
    let q = rand(&mut r, &[bsz, heads, t, d], 2.0);
    let [y, g] = value_and_grad(&q, |x| fused::rope(x, cos, sin, 3).unwrap(), 6);
    out.push(("rope", y));
    out.push(("rope grad", g));
    let qkv = rand(&mut r, &[bsz, t, 3 * w], 2.0);
    for causal in [false, true] {
        let [y, g] = value_and_grad(
            &qkv,
            |x| kernels::self_attention(x, heads, causal, causal.then(|| rope.tables())).unwrap(),
            7,
        );
        out.push(("self_attention", y));
        out.push(("self_attention grad", g));
    }
    let mut cache = kernels::KvCache::new(bsz, heads, d, 16);
    let tables = (&cos[..], &sin[..]);
    for (at, len) in [(0, 6), (6, 1), (7, 4)] {
        let part = qkv.narrow(1, at, len).unwrap();
        let y = kernels::cached_attention(&part, heads, tables, &mut cache).unwrap();
        out.push(("cached_attention", bits(&y)));
    }

    // cross-entropy over a 3,000-word vocabulary, some rows masked out
    let (rows, vocab) = (13, 3001);
    let logits = rand(&mut r, &[rows, vocab], 8.0);
    let targets: Vec<u32> = (0..rows).map(|_| r.gen_range(0..vocab as u32)).collect();
    let targets = Tensor::from_vec(targets, rows, &Device::Cpu).unwrap();
    let keep: Vec<f32> = (0..rows).map(|i| f32::from(u8::from(i % 4 != 1))).collect();
    let keep = Tensor::from_vec(keep, rows, &Device::Cpu).unwrap();
    let lv = Var::from_tensor(&logits).unwrap();
    let loss = fused::cross_entropy(lv.as_tensor(), &targets, &keep, 0.1).unwrap();
    let g = loss.backward().unwrap();
    out.push(("cross_entropy", bits(&loss.reshape(1).unwrap())));
    out.push(("cross_entropy grad", bits(g.get(lv.as_tensor()).unwrap())));

    // Q4_0 dequantisation, large enough to split over the pool
    let wq = rand(&mut r, &[40, 4096], 3.0);
    let q = QTensor::quantize(&wq, GgmlDType::Q4_0).unwrap();
    out.push(("q4_0", bits(&quant::dequantize(&q, &Device::Cpu).unwrap())));
    out
}

#[test]
fn every_isa_level_gives_baseline_bits() {
    let best = vmath::isa();
    assert!(best.available());
    assert!(vmath::force_isa(Isa::Baseline));
    let want = outputs();
    let mut compared = 0;
    for level in [Isa::Avx2, Isa::Avx512] {
        if !vmath::force_isa(level) {
            eprintln!("{}: not on this CPU, skipped", level.name());
            continue;
        }
        assert_eq!(vmath::isa(), level);
        let got = outputs();
        assert_eq!(got.len(), want.len());
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let first = g.iter().zip(w).position(|(a, b)| a != b);
            assert!(
                g.len() == w.len() && first.is_none(),
                "{name} at {}: element {first:?} differs from baseline",
                level.name()
            );
        }
        compared += 1;
        eprintln!(
            "{}: {} kernel outputs equal baseline",
            level.name(),
            got.len()
        );
    }
    assert!(vmath::force_isa(best));
    // the best level the CPU has was among those compared
    assert!(best == Isa::Baseline || compared >= 1);
}

#[test]
fn q4_0_dequantisation_matches_candle_bit_for_bit() {
    // 3 rows of 4,192 values: more than one rayon task, with a partial last one
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let w = rand(&mut r, &[3, 4096 + 96], 3.0);
    let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
    let want = q.dequantize(&Device::Cpu).unwrap();
    let got = quant::dequantize(&q, &Device::Cpu).unwrap();
    assert_eq!(got.dims(), want.dims());
    assert_eq!(bits(&got), bits(&want));
}
