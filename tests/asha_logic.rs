//! Successive halving's decisions (`ecic::sweep::asha`) against a simple
//! model of them: whatever the order results arrive in, the top 1/eta of
//! every completed rung is promoted, every promotion was in the top 1/eta of
//! its rung's results when it was decided, and the decisions replay from the
//! results in arrival order. Also the rung budgets `[search.asha]` gives.

use std::collections::BTreeSet;

use ecic::spec::asha::{Asha, Mode};
use ecic::sweep::asha::{decide, Arrival, Halving};
use proptest::prelude::*;
use serde_json::json;

/// The simple model: rank a rung's results (value, then arrival), the top
/// floor(n/eta) are in.
fn top(results: &[(usize, f64)], eta: usize, mode: Mode) -> Vec<usize> {
    let mut v: Vec<(usize, usize, f64)> = results
        .iter()
        .enumerate()
        .map(|(i, &(t, x))| (i, t, x))
        .collect();
    v.sort_by(|a, b| {
        let c = match mode {
            Mode::Max => b.2.partial_cmp(&a.2).unwrap(),
            Mode::Min => a.2.partial_cmp(&b.2).unwrap(),
        };
        c.then(a.0.cmp(&b.0))
    });
    v.into_iter()
        .take(results.len() / eta)
        .map(|(_, t, _)| t)
        .collect()
}

/// A search played out: every trial's rung-0 result, then each promoted
/// trial's next result, the next result to arrive picked by `order` among
/// those pending (any interleaving a pool of workers could produce). A
/// trial's value at rung r is its `quality` plus r. Returns the state and
/// every promotion with the results of its rung when it was decided.
/// Promotions: (trial, from rung, that rung's results when decided).
type Decided = Vec<(usize, usize, Vec<(usize, f64)>)>;

fn play(
    quality: &[f64],
    order: &[u64],
    eta: usize,
    rungs: usize,
    mode: Mode,
) -> (Halving, Decided) {
    let mut h = Halving::new(eta, rungs, mode);
    let mut pending: Vec<(usize, usize)> = (0..quality.len()).map(|t| (t, 0)).collect();
    let mut decided = Vec::new();
    let mut i = 0;
    while !pending.is_empty() {
        let pick = (order[i % order.len()] as usize) % pending.len();
        i += 1;
        let (t, r) = pending.remove(pick);
        let v = quality[t] + r as f64;
        for p in h.arrive(&Arrival {
            trial: t,
            rung: r,
            value: v,
        }) {
            decided.push((p, r, h.results(r).to_vec()));
            pending.push((p, r + 1));
        }
    }
    (h, decided)
}

proptest! {
    #[test]
    fn promotions_are_the_top_of_each_rung_whatever_the_order(
        quality in prop::collection::vec(0u32..50, 1..40),
        order in prop::collection::vec(any::<u64>(), 1..60),
        eta in 2usize..5,
        rungs in 1usize..5,
        max in any::<bool>(),
    ) {
        let quality: Vec<f64> = quality.into_iter().map(f64::from).collect();
        let mode = if max { Mode::Max } else { Mode::Min };
        let (h, decided) = play(&quality, &order, eta, rungs, mode);
        for r in 0..rungs {
            let results = h.results(r);
            if r + 1 < rungs {
                // Once a rung is complete, its top 1/eta are promoted, and
                // only trials with a result there.
                for t in top(results, eta, mode) {
                    prop_assert!(h.promoted(r).contains(&t), "rung {}: {} not promoted", r, t);
                }
                for t in h.promoted(r) {
                    prop_assert!(results.iter().any(|(x, _)| x == t));
                }
            } else {
                prop_assert!(h.promoted(r).is_empty(), "the top rung promotes nobody");
            }
        }
        // Every promotion was in the top floor(n/eta) of its rung's results
        // when it was decided.
        for (t, r, at) in &decided {
            prop_assert!(top(at, eta, mode).contains(t), "{} promoted from rung {} outside the top of {:?}", t, r, at);
            prop_assert!(r + 1 < rungs);
        }
        // Stopped: exactly the trials with a result below the top rung that
        // were not promoted out of it.
        let stopped: BTreeSet<(usize, usize)> = h.stopped().into_iter().collect();
        for r in 0..rungs.saturating_sub(1) {
            for &(t, _) in h.results(r) {
                prop_assert_eq!(stopped.contains(&(t, r)), !h.promoted(r).contains(&t));
            }
        }
        // The decisions replay from the results in their arrival order (a
        // rung's decisions depend on that rung's results alone).
        let arrivals: Vec<Arrival> = (0..rungs)
            .flat_map(|r| {
                h.results(r)
                    .iter()
                    .map(move |&(t, v)| Arrival { trial: t, rung: r, value: v })
            })
            .collect();
        let mut again = Halving::new(eta, rungs, mode);
        for a in &arrivals {
            again.arrive(a);
        }
        for r in 0..rungs {
            prop_assert_eq!(again.promoted(r), h.promoted(r));
        }
    }

    #[test]
    fn best_first_exactly_the_top_is_promoted(
        quality in prop::collection::vec(0u32..1000, 1..40),
        eta in 2usize..5,
    ) {
        // Results arriving best first promote exactly the top floor(n/eta),
        // as synchronous halving would.
        let mut q: Vec<f64> = quality.into_iter().map(f64::from).collect();
        q.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let arrivals: Vec<Arrival> = q
            .iter()
            .enumerate()
            .map(|(t, &v)| Arrival { trial: t, rung: 0, value: v })
            .collect();
        let got: BTreeSet<usize> = decide(eta, 2, Mode::Max, &arrivals)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let results: Vec<(usize, f64)> = arrivals.iter().map(|a| (a.trial, a.value)).collect();
        let want: BTreeSet<usize> = top(&results, eta, Mode::Max).into_iter().collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn nine_trials_eta_three() {
    // 9 trials at rung 0, value = trial, worst first: from the third result
    // on (floor(n/3) >= 1) every new result is the best so far, so it is in
    // the top third when it arrives and is promoted. Asynchrony promotes on
    // the evidence at hand; in this worst case all but the first two.
    let arrivals: Vec<Arrival> = (0..9)
        .map(|t| Arrival {
            trial: t,
            rung: 0,
            value: t as f64,
        })
        .collect();
    let got = decide(3, 3, Mode::Max, &arrivals);
    assert_eq!(
        got,
        [(2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1)]
    );
    let mut h = Halving::new(3, 3, Mode::Max);
    for a in &arrivals {
        h.arrive(a);
    }
    assert_eq!(h.stopped(), [(0, 0), (1, 0)]);
    // Minimising, the same order is best first: exactly the top three.
    let got = decide(3, 3, Mode::Min, &arrivals);
    assert_eq!(got, [(0, 1), (1, 1), (2, 1)]);
    // A NaN ranks last; a second result for a trial at a rung is ignored.
    let mut h = Halving::new(2, 2, Mode::Max);
    assert!(h
        .arrive(&Arrival {
            trial: 0,
            rung: 0,
            value: f64::NAN
        })
        .is_empty());
    assert!(h
        .arrive(&Arrival {
            trial: 0,
            rung: 0,
            value: 9.0
        })
        .is_empty());
    assert_eq!(
        h.arrive(&Arrival {
            trial: 1,
            rung: 0,
            value: -1.0
        }),
        [1]
    );
}

#[test]
fn rungs_grow_by_eta_and_end_at_max_steps() {
    let asha = |t: serde_json::Value| Asha::of(&json!({ "asha": t })).expect("valid");
    let a = asha(json!({"metric": "cider_d", "min_steps": 20, "max_steps": 180}));
    assert_eq!(a.rungs(), [20, 60, 180]);
    assert_eq!(
        (a.eta, a.mode, a.stage.as_str()),
        (3, Mode::Max, "domain_adapt")
    );
    let a = asha(json!({
        "metric": "loss", "min_steps": 30, "max_steps": 200, "reduction_factor": 2
    }));
    assert_eq!(a.rungs(), [30, 60, 120, 200]);
    assert_eq!(a.mode, Mode::Min, "a loss is minimised unless told");
    let a = asha(json!({"metric": "cider_d", "min_steps": 50, "max_steps": 50}));
    assert_eq!(a.rungs(), [50], "one rung: no halving");
    assert!(
        Asha::of(&json!({"asha": {"metric": "cider_d", "min_steps": 0, "max_steps": 5}})).is_none()
    );
}
