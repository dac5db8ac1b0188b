//! `[search]`: sampled trials beside the grid.
//!
//! ```toml
//! [search]
//! method = "sobol"          # or "random"
//! trials = 27
//! seed = 0                  # of the sampler, not of training
//! "stages.domain_adapt.lr" = { loguniform = [1e-4, 1e-2] }
//! "peft.lora.r" = { int = [2, 16] }
//! "peft.lora.alpha" = { choice = [8.0, 16.0, 32.0] }
//! ```
//!
//! Every key other than `method`, `trials`, `seed` and the `asha` table
//! (successive halving of the trials, see [`super::asha`]) is a dotted spec key
//! with one distribution: `uniform = [low, high]`, `loguniform = [low, high]`
//! (low > 0), `int = [low, high]` (both ends included) or `choice = [v, ...]`.
//! The `trials` samples are one zipped axis (named `trial`) that multiplies
//! with the grid, so every grid cell gets the same N trials (and every seed).
//!
//! Samples are drawn once per spec, deterministically from `seed`: `random`
//! uses a ChaCha generator, `sobol` the first N points of an Owen-scrambled
//! Sobol sequence (`sobol_burley`), which covers the box more evenly for small
//! N. Continuous values are rounded to 3 significant digits, so the sampled
//! configuration reads (and is stored) as the value it was trained with.

use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::error::Issues;

/// The keys of `[search]` that are not distributions.
const SETTINGS: &[&str] = &["method", "trials", "seed", "asha"];
const DISTRIBUTIONS: &[&str] = &["uniform", "loguniform", "int", "choice"];
/// The most dimensions `sobol_burley` provides.
const MAX_DIMS: usize = 256;

/// One key's distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    Uniform(f64, f64),
    LogUniform(f64, f64),
    Int(i64, i64),
    Choice(Vec<Value>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Random,
    Sobol,
}

/// A validated `[search]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    pub method: Method,
    pub trials: usize,
    pub seed: u64,
    /// (dotted spec key, distribution), in key order (the order of the
    /// sampled axes, whatever the order written).
    pub params: Vec<(String, Dist)>,
    /// Successive halving of the trials (`[search.asha]`), if asked for.
    pub asha: Option<super::asha::Asha>,
}

impl Dist {
    /// The value at `u` in [0, 1).
    fn at(&self, u: f64) -> Value {
        match self {
            Dist::Uniform(lo, hi) => number(round3(lo + u * (hi - lo)).clamp(*lo, *hi)),
            Dist::LogUniform(lo, hi) => {
                let x = (lo.ln() + u * (hi.ln() - lo.ln())).exp();
                number(round3(x).clamp(*lo, *hi))
            }
            Dist::Int(lo, hi) => {
                let n = (hi - lo + 1) as f64;
                Value::from(lo + ((u * n) as i64).min(hi - lo))
            }
            Dist::Choice(vs) => vs[((u * vs.len() as f64) as usize).min(vs.len() - 1)].clone(),
        }
    }
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// `x` to 3 significant digits.
fn round3(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let digits = 2 - x.abs().log10().floor() as i32;
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

impl Search {
    /// The sampled trials: `trials` rows of one value per param.
    pub fn sample(&self) -> Vec<Vec<Value>> {
        let dims = self.params.len();
        match self.method {
            Method::Random => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
                (0..self.trials)
                    .map(|_| {
                        self.params
                            .iter()
                            .map(|(_, d)| d.at(rng.gen::<f64>()))
                            .collect()
                    })
                    .collect()
            }
            Method::Sobol => {
                let seed = (self.seed ^ (self.seed >> 32)) as u32;
                (0..self.trials)
                    .map(|i| {
                        (0..dims)
                            .map(|d| {
                                let u = sobol_burley::sample(i as u32, d as u32, seed) as f64;
                                self.params[d].1.at(u)
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }
}

/// Read `[search]` (absent: `None`), reporting every problem with its key.
pub(super) fn parse(v: Option<&Value>, issues: &mut Issues) -> Option<Search> {
    let v = v?;
    let Value::Object(table) = v else {
        issues.at("search", "must be a table");
        return None;
    };
    let before = issues.list.len();
    let method = match table.get("method") {
        None => Method::Random,
        Some(Value::String(s)) if s == "random" => Method::Random,
        Some(Value::String(s)) if s == "sobol" => Method::Sobol,
        Some(other) => {
            issues.at(
                "search.method",
                format!("expected \"random\" or \"sobol\", got {other}"),
            );
            Method::Random
        }
    };
    let trials = match table.get("trials") {
        Some(t) => match t.as_u64() {
            Some(n) if n >= 1 => n as usize,
            _ => {
                issues.at(
                    "search.trials",
                    format!("must be a whole number of at least 1, got {t}"),
                );
                0
            }
        },
        None => {
            issues.at("search.trials", "missing: how many trials to sample");
            0
        }
    };
    let seed = match table.get("seed") {
        None => 0,
        Some(s) => s.as_u64().unwrap_or_else(|| {
            issues.at("search.seed", format!("must be a whole number, got {s}"));
            0
        }),
    };
    let asha = table
        .get("asha")
        .and_then(|a| super::asha::parse(a, issues));
    let mut params = Vec::new();
    for (key, value) in table {
        if SETTINGS.contains(&key.as_str()) {
            continue;
        }
        collect(key, value, &mut params, issues);
    }
    // Said only when no key was given (a key with a bad distribution was
    // reported already).
    if !table.keys().any(|k| !SETTINGS.contains(&k.as_str())) {
        issues.at(
            "search",
            "names no key to search (e.g. \"stages.domain_adapt.lr\" = { loguniform = [1e-4, 1e-2] })",
        );
    }
    if method == Method::Sobol && params.len() > MAX_DIMS {
        issues.at(
            "search",
            format!(
                "sobol samples at most {MAX_DIMS} keys, got {}",
                params.len()
            ),
        );
    }
    (issues.list.len() == before).then_some(Search {
        method,
        trials,
        seed,
        params,
        asha,
    })
}

/// A distribution at `key`, or (an unquoted dotted key in TOML) a table of
/// further keys.
fn collect(key: &str, value: &Value, out: &mut Vec<(String, Dist)>, issues: &mut Issues) {
    let at = format!("search.{key}");
    let Value::Object(m) = value else {
        issues.at(
            at,
            format!(
                "expected a distribution such as {{ loguniform = [1e-4, 1e-2] }} (one of {}), got {value}",
                DISTRIBUTIONS.join(", ")
            ),
        );
        return;
    };
    let is_dist = m.len() == 1 && m.keys().all(|k| DISTRIBUTIONS.contains(&k.as_str()));
    if !is_dist {
        if m.len() == 1 && m.values().all(|v| !v.is_object()) {
            let kind = m.keys().next().expect("one entry");
            issues.at(
                at,
                format!(
                    "unknown distribution `{kind}` (expected one of {})",
                    DISTRIBUTIONS.join(", ")
                ),
            );
            return;
        }
        if m.keys().any(|k| DISTRIBUTIONS.contains(&k.as_str())) || m.is_empty() {
            issues.at(
                at,
                format!(
                    "expected exactly one distribution ({}), got {}",
                    DISTRIBUTIONS.join(", "),
                    Value::Object(m.clone())
                ),
            );
            return;
        }
        for (k, v) in m {
            collect(&format!("{key}.{k}"), v, out, issues);
        }
        return;
    }
    let (kind, args) = m.iter().next().expect("one entry");
    if let Some(d) = dist(kind, args, &at, issues) {
        out.push((key.to_string(), d));
    }
}

fn dist(kind: &str, args: &Value, at: &str, issues: &mut Issues) -> Option<Dist> {
    if kind == "choice" {
        return match args {
            Value::Array(vs) if !vs.is_empty() => Some(Dist::Choice(vs.clone())),
            _ => {
                issues.at(
                    at,
                    format!("choice needs a non-empty list of values, got {args}"),
                );
                None
            }
        };
    }
    let pair = match args {
        Value::Array(vs) if vs.len() == 2 => Some((&vs[0], &vs[1])),
        _ => None,
    };
    let Some((lo, hi)) = pair else {
        issues.at(at, format!("{kind} needs [low, high], got {args}"));
        return None;
    };
    if kind == "int" {
        let (Some(l), Some(h)) = (lo.as_i64(), hi.as_i64()) else {
            issues.at(
                at,
                format!("int needs two whole numbers [low, high], got {args}"),
            );
            return None;
        };
        if l > h {
            issues.at(at, format!("low ({l}) is above high ({h})"));
            return None;
        }
        return Some(Dist::Int(l, h));
    }
    let (Some(l), Some(h)) = (lo.as_f64(), hi.as_f64()) else {
        issues.at(
            at,
            format!("{kind} needs two numbers [low, high], got {args}"),
        );
        return None;
    };
    if l > h {
        issues.at(at, format!("low ({l}) is above high ({h})"));
        return None;
    }
    if kind == "loguniform" {
        if l <= 0.0 {
            issues.at(at, format!("loguniform needs low > 0, got {l}"));
            return None;
        }
        return Some(Dist::LogUniform(l, h));
    }
    Some(Dist::Uniform(l, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(v: Value) -> (Option<Search>, Vec<String>) {
        let mut issues = Issues::default();
        let s = parse(Some(&v), &mut issues);
        let msgs = issues
            .list
            .iter()
            .map(|i| format!("{}: {}", i.key.clone().unwrap_or_default(), i.message))
            .collect();
        (s, msgs)
    }

    #[test]
    fn samples_are_deterministic_and_inside_their_ranges() {
        for method in ["random", "sobol"] {
            let v = json!({
                "method": method, "trials": 64, "seed": 7,
                "stages.domain_adapt.lr": {"loguniform": [1e-4, 1e-2]},
                "peft.lora.r": {"int": [2, 16]},
                "peft.lora.alpha": {"choice": [8.0, 16.0]},
                "stages.x": {"uniform": [-1.0, 1.0]},
            });
            let (s, msgs) = parsed(v);
            assert!(msgs.is_empty(), "{msgs:?}");
            let s = s.unwrap();
            let a = s.sample();
            assert_eq!(a, s.sample(), "{method}: same seed, same trials");
            assert_eq!(a.len(), 64);
            let mut ranks = std::collections::BTreeSet::new();
            let col = |key: &str| s.params.iter().position(|(k, _)| k == key).unwrap();
            for row in &a {
                let lr = row[col("stages.domain_adapt.lr")].as_f64().unwrap();
                assert!((1e-4..=1e-2).contains(&lr), "{lr}");
                let r = row[col("peft.lora.r")].as_i64().unwrap();
                assert!((2..=16).contains(&r), "{r}");
                ranks.insert(r);
                let alpha = row[col("peft.lora.alpha")].as_f64().unwrap();
                assert!([8.0, 16.0].contains(&alpha), "{alpha}");
                let x = row[col("stages.x")].as_f64().unwrap();
                assert!((-1.0..=1.0).contains(&x), "{x}");
            }
            // 64 draws over 15 integers reach both ends' neighbourhoods.
            assert!(ranks.len() >= 10, "{method}: {ranks:?}");
            let mut other = s.clone();
            other.seed = 8;
            assert_ne!(a, other.sample(), "{method}: another seed, other trials");
        }
    }

    #[test]
    fn sobol_spreads_the_first_points_over_the_range() {
        // The first 8 points of a (scrambled) Sobol sequence put one point in
        // each eighth of every dimension; 8 random draws rarely do.
        let (s, _) = parsed(json!({
            "method": "sobol", "trials": 8,
            "a": {"uniform": [0.0, 1.0]}, "b": {"uniform": [0.0, 1.0]},
        }));
        for d in 0..2 {
            let mut cells: Vec<usize> = s
                .as_ref()
                .unwrap()
                .sample()
                .iter()
                .map(|r| ((r[d].as_f64().unwrap() * 8.0) as usize).min(7))
                .collect();
            cells.sort();
            cells.dedup();
            assert_eq!(cells.len(), 8, "dimension {d}: {cells:?}");
        }
    }

    #[test]
    fn bad_distributions_name_their_key() {
        let (s, msgs) = parsed(json!({
            "trials": 3,
            "a": {"uniform": [2.0, 1.0]},
            "b": {"loguniform": [0.0, 1.0]},
            "c": {"int": [1.5, 3]},
            "d": {"choice": []},
            "e": {"normal": [0, 1]},
            "f": 3,
        }));
        assert!(s.is_none());
        let want = [
            "search.a: low (2) is above high (1)",
            "search.b: loguniform needs low > 0, got 0",
            "search.c: int needs two whole numbers",
            "search.d: choice needs a non-empty list",
            "search.e: unknown distribution `normal`",
            "search.f: expected a distribution",
        ];
        for w in want {
            assert!(msgs.iter().any(|m| m.starts_with(w)), "{w} not in {msgs:?}");
        }
        let (_, msgs) = parsed(json!({"method": "grid", "a": {"uniform": [0, 1]}}));
        assert!(
            msgs.iter().any(|m| m.starts_with("search.method:")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.starts_with("search.trials: missing")),
            "{msgs:?}"
        );
    }

    #[test]
    fn rounding_keeps_three_significant_digits() {
        assert_eq!(round3(0.000123456), 0.000123);
        assert_eq!(round3(123456.0), 123000.0);
        assert_eq!(round3(-0.98765), -0.988);
    }
}
