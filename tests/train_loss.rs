//! Label-smoothed masked cross-entropy against the pure-Python transcription of torch's definition kept
//! beside its fixture (tests/train_fixtures/smoothed_ce_reference.py): the value and the gradient.

use candle_core::{Device, Tensor, Var};
use ecic::train::smoothed_cross_entropy;

#[test]
fn smoothed_cross_entropy_matches_reference_value_and_gradient() {
    let text = std::fs::read_to_string("tests/train_fixtures/smoothed_ce_reference.json").unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let logits = rows(&r["logits"]);
    let (n, v) = (logits.len(), logits[0].len());
    let flat: Vec<f32> = logits.iter().flatten().map(|&x| x as f32).collect();
    let targets: Vec<u32> = r["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let mask: Vec<f32> = r["mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let dev = Device::Cpu;
    // as [B=1, T=n, V] to exercise the flattening
    let x = Var::from_vec(flat, (1, n, v), &dev).unwrap();
    let y = Tensor::from_vec(targets, (1, n), &dev).unwrap();
    let m = Tensor::from_vec(mask, (1, n), &dev).unwrap();
    let loss =
        smoothed_cross_entropy(x.as_tensor(), &y, Some(&m), r["eps"].as_f64().unwrap()).unwrap();
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    let want = r["loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "{got} vs {want}"
    );
    let grads = loss.backward().unwrap();
    let g = grads
        .get(&x)
        .unwrap()
        .reshape((n, v))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, (gr, wr)) in g.iter().zip(rows(&r["grad"])).enumerate() {
        for (j, (a, b)) in gr.iter().zip(wr).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-6, "grad[{i}][{j}]: {a} vs {b}");
        }
    }
}

#[test]
fn without_smoothing_or_mask_it_is_plain_cross_entropy() {
    let dev = Device::Cpu;
    let x = Tensor::from_vec(
        (0..12).map(|i| (i as f32 * 0.37).cos()).collect::<Vec<_>>(),
        (3, 4),
        &dev,
    )
    .unwrap();
    let y = Tensor::from_vec(vec![0u32, 3, 1], 3, &dev).unwrap();
    let ours = smoothed_cross_entropy(&x, &y, None, 0.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let theirs = candle_nn::loss::cross_entropy(&x, &y)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((ours - theirs).abs() < 1e-6, "{ours} vs {theirs}");
    let zero = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
    assert_eq!(
        smoothed_cross_entropy(&x, &y, Some(&zero), 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}
