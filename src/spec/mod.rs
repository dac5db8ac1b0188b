//! Specs: raw TOML (figment) -> validated [`Config`] -> expanded grid [`Cell`]s.
//!
//! Sources, later wins: the TOML file, `ECIC_*` environment variables
//! (`ECIC_STAGES__DOMAIN_ADAPT__LR=1e-4`), then `--set key.path=VALUE` (TOML
//! value syntax). The merged tree is validated as a whole and per cell; every
//! problem is reported at once with its key path and, where the file has it,
//! line and column. Downstream code (plan, stages) only ever sees validated
//! cells.

pub mod asha;
pub mod checkpoint;
mod error;
pub mod grid;
pub mod params;
pub mod search;
mod validate;

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde_json::Value;

pub use error::{SpecError, SpecIssue};
pub use grid::Cell;
pub use params::Config;

use error::Issues;

/// A loaded, validated and expanded spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The spec file.
    pub path: PathBuf,
    /// The file's text as read (stored with the sweep, shown in the report).
    pub text: String,
    /// The `--set` overrides as given.
    pub sets: Vec<String>,
    /// The merged tree before cell expansion.
    pub base: Value,
    /// The validated base configuration (the first value of every axis is not
    /// applied here; see `cells`).
    pub config: Config,
    /// Names of the grid axes in expansion order.
    pub axes: Vec<String>,
    /// The expanded cells, each with its own resolved configuration.
    pub cells: Vec<Cell>,
}

impl Spec {
    /// Load, merge, validate and expand a spec file.
    pub fn load(path: &Path, sets: &[String]) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            path: path.to_path_buf(),
            issues: vec![SpecIssue {
                key: None,
                pos: None,
                message: format!("cannot read the spec: {e}"),
                origin: None,
            }],
        })?;
        Spec::from_text(path, text, sets)
    }

    /// [`Spec::load`] of a spec's text as read from `path` (which names it in
    /// messages and anchors its relative paths; it is not read).
    pub fn from_text(path: &Path, text: String, sets: &[String]) -> Result<Spec, SpecError> {
        let fail = |issues: Vec<SpecIssue>| SpecError {
            path: path.to_path_buf(),
            issues,
        };
        // Syntax first, with the parser's own position.
        if let Err(e) = text.parse::<toml::Table>() {
            let pos = e.span().and_then(|s| error::offset_to_pos(&text, s.start));
            return Err(fail(vec![SpecIssue {
                key: None,
                pos,
                message: format!("TOML syntax error: {}", e.message()),
                origin: None,
            }]));
        }
        let mut issues = Issues::default();
        let mut figment = Figment::new().merge(Toml::string(&text)).merge(
            // Only variables naming spec keys: ECIC_RUNS, ECIC_LOG ... are not spec values.
            Env::prefixed("ECIC_")
                .filter(|k| {
                    let first = k
                        .as_str()
                        .split("__")
                        .next()
                        .unwrap_or_default()
                        .to_ascii_lowercase();
                    validate::TOP_KEYS.contains(&first.as_str())
                })
                .split("__"),
        );
        // Floats TOML allows but JSON (the tree below) cannot hold: said
        // here, and the "invalid type: null" they become later is dropped.
        let mut nan_keys: Vec<String> = Vec::new();
        if let Ok(table) = text.parse::<toml::Table>() {
            for (key, v) in validate::non_finite(&toml::Value::Table(table), "") {
                issues.at(&key, format!("must be a finite number (got {v})"));
                nan_keys.push(key);
            }
        }
        let mut set_keys: Vec<(String, String)> = Vec::new();
        for set in sets {
            match parse_set(set) {
                Ok((key, value)) => {
                    for (k, v) in validate::non_finite(&value, &key) {
                        issues.at(&k, format!("must be a finite number (got {v})"));
                        nan_keys.push(k);
                    }
                    set_keys.push((key.clone(), set.clone()));
                    figment = figment.merge(Serialized::global(&key, value));
                }
                Err(msg) => issues.general(msg),
            }
        }
        let positioned = |text: &str, mut issues: Issues| {
            issues.list.retain(|i| {
                !(i.message.starts_with("invalid type: null")
                    && i.key.as_ref().is_some_and(|k| nan_keys.contains(k)))
            });
            positioned(text, issues, &set_keys)
        };
        let base: Value = match figment.extract() {
            Ok(mut v) => {
                fill_stage_defaults(&mut v);
                v
            }
            Err(e) => {
                for err in e {
                    let key = err.path.join(".");
                    issues.at(key, err.kind.to_string());
                }
                return Err(fail(positioned(&text, issues)));
            }
        };
        let spec_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let result = grid::expand(&base, &spec_dir, &mut issues);
        if let Some((_, _, cells)) = &result {
            asha::check_cells(&base, cells, &mut issues);
        }
        if !issues.is_empty() {
            return Err(fail(positioned(&text, issues)));
        }
        let (config, axes, cells) =
            result.expect("expand returns a result when there are no issues");
        Ok(Spec {
            path: path.to_path_buf(),
            text,
            sets: sets.to_vec(),
            base,
            config,
            axes,
            cells,
        })
    }

    /// The directory the spec's relative paths are resolved against.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

/// A nested table missing some keys takes them from its type's `Default`, which for
/// [`params::TrainSpec`] is the generic one; the foundation stages have defaults of their own
/// ([`params::StagesSpec::default`]), filled in here so that `[stages.pretrain_vision]
/// steps = 100` keeps that stage's batch size and learning rate.
fn fill_stage_defaults(base: &mut Value) {
    let defaults = serde_json::to_value(params::StagesSpec::default()).unwrap_or(Value::Null);
    let Some(Value::Object(stages)) = base.get_mut("stages") else {
        return;
    };
    for kind in ["pretrain_vision", "pretrain_lm"] {
        if let (Some(Value::Object(given)), Some(Value::Object(d))) =
            (stages.get_mut(kind), defaults.get(kind))
        {
            for (k, v) in d {
                given.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
}

/// Attach file positions to issues whose key is found in the text; an issue
/// about a key a `--set` gave (`sets`: key, the argument as given) is
/// attributed to that argument instead, never to a line of the file.
fn positioned(text: &str, issues: Issues, sets: &[(String, String)]) -> Vec<SpecIssue> {
    let under = |key: &str, set: &str| {
        key == set
            || key.strip_prefix(set).is_some_and(|r| r.starts_with('.'))
            || set.strip_prefix(key).is_some_and(|r| r.starts_with('.'))
    };
    issues
        .list
        .into_iter()
        .map(|mut i| {
            if let Some(key) = &i.key {
                if let Some((_, arg)) = sets.iter().rev().find(|(k, _)| under(key, k)) {
                    i.origin = Some(format!("--set {arg}"));
                    i.pos = None;
                    return i;
                }
            }
            if i.pos.is_none() {
                if let Some(key) = &i.key {
                    i.pos = error::locate(text, key);
                }
            }
            i
        })
        .collect()
}

/// `key.path=VALUE` with VALUE in TOML syntax (a bare word is a string).
fn parse_set(set: &str) -> Result<(String, toml::Value), String> {
    let Some((key, raw)) = set.split_once('=') else {
        return Err(format!("--set `{set}`: expected KEY=VALUE"));
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(format!(
            "--set `{set}`: the key must be a dotted path such as `stages.evaluate.method`"
        ));
    }
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("the key just parsed"),
        // A bare word is a string (`--set stages.evaluate.method=beam`);
        // anything else that is not TOML is a mistake, not a string.
        Err(_) if is_bare_word(raw) => toml::Value::String(raw.to_string()),
        Err(e) => {
            return Err(format!(
                "--set `{set}`: `{raw}` is not a TOML value ({}); quote a string: {key}='\"...\"'",
                e.message().trim()
            ))
        }
    };
    Ok((key.to_string(), value))
}

/// Letters, digits and `_-./:+@` only: read as a string when not TOML.
fn is_bare_word(raw: &str) -> bool {
    !raw.is_empty()
        && raw
            .chars()
            .all(|c| c.is_alphanumeric() || "_-./:+@".contains(c))
}
