//! Spec errors: every problem found, each with its key path and, where the TOML
//! file has it, line and column.

use std::fmt;
use std::path::PathBuf;

/// One problem in a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecIssue {
    /// Dotted key path (`stages.domain_adapt.lr`), if the problem has one.
    pub key: Option<String>,
    /// 1-based line and column in the spec file, where known.
    pub pos: Option<(usize, usize)>,
    pub message: String,
    /// Where the value came from when not the spec file (`--set KEY=VALUE`).
    pub origin: Option<String>,
}

/// Everything wrong with a spec, reported at once.
#[derive(Debug, thiserror::Error)]
pub struct SpecError {
    pub path: PathBuf,
    pub issues: Vec<SpecIssue>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        write!(
            f,
            "{} problem{} in spec {}",
            n,
            if n == 1 { "" } else { "s" },
            self.path.display()
        )?;
        for issue in &self.issues {
            match &issue.origin {
                Some(origin) => write!(f, "\n  {origin}")?,
                None => {
                    write!(f, "\n  {}", self.path.display())?;
                    if let Some((line, col)) = issue.pos {
                        write!(f, ":{line}:{col}")?;
                    }
                }
            }
            write!(f, ": ")?;
            if let Some(key) = &issue.key {
                write!(f, "`{key}`: ")?;
            }
            write!(f, "{}", issue.message)?;
        }
        Ok(())
    }
}

/// Collects issues while validating.
#[derive(Debug, Default)]
pub struct Issues {
    pub list: Vec<SpecIssue>,
}

impl Issues {
    pub fn at(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let issue = SpecIssue {
            key: Some(key.into()),
            pos: None,
            message: message.into(),
            origin: None,
        };
        if !self.list.contains(&issue) {
            self.list.push(issue);
        }
    }
    pub fn general(&mut self, message: impl Into<String>) {
        let issue = SpecIssue {
            key: None,
            pos: None,
            message: message.into(),
            origin: None,
        };
        if !self.list.contains(&issue) {
            self.list.push(issue);
        }
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// `did you mean `x`?` for the closest candidate, if it is close enough.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
}

/// Line and column (1-based) of a dotted key path in a TOML text.
pub fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    let mut span = None;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let next = match item {
            toml_edit::Item::Table(t) => {
                // A quoted key holding dots (`"stages.domain_adapt.lr" = ...` in
                // `[grid]` or `[search]`) is the rest of the path in one piece.
                let rest = parts[i..].join(".");
                if let Some((k, v)) = t.get_key_value(&rest).filter(|_| i + 1 < parts.len()) {
                    return offset_to_pos(text, k.span().or_else(|| v.span())?.start);
                }
                let (k, v) = t.get_key_value(part)?;
                span = k.span().or_else(|| v.span());
                v
            }
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                let (k, v) = t.get_key_value(part)?;
                span = k.span().or_else(|| v.span());
                v
            }
            toml_edit::Item::ArrayOfTables(a) => {
                // `exclude.0.backbone`: point at the table, deeper keys are rare.
                let idx: usize = part.parse().ok()?;
                return offset_to_pos(text, a.get(idx)?.span()?.start);
            }
            _ => return offset_to_pos(text, span?.start),
        };
        item = next;
    }
    offset_to_pos(text, span?.start)
}

pub fn offset_to_pos(text: &str, offset: usize) -> Option<(usize, usize)> {
    let before = text.get(..offset)?;
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    Some((line, col))
}
