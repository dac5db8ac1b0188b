//! Reading `config.json`: typed getters whose errors name the file and the dotted key path
//! (`text_config.rope_scaling`), so every family reports a bad value the same way.

use std::path::Path;

use serde_json::Value;

use super::HfError;

/// A JSON object of `config.json` (the top level or a nested `text_config`), with the key path
/// that leads to it.
pub(crate) struct Cfg<'a> {
    pub path: &'a Path,
    pub v: &'a Value,
    pub at: String,
}

impl<'a> Cfg<'a> {
    pub fn top(path: &'a Path, v: &'a Value) -> Self {
        Cfg {
            path,
            v,
            at: String::new(),
        }
    }
    pub fn err(&self, msg: impl std::fmt::Display) -> HfError {
        HfError::Config {
            path: self.path.to_path_buf(),
            msg: msg.to_string(),
        }
    }
    pub fn key(&self, k: &str) -> String {
        format!("{}{k}", self.at)
    }
    pub fn child(&self, k: &str) -> Result<Cfg<'a>, HfError> {
        match self.v.get(k) {
            Some(v) if v.is_object() => Ok(Cfg {
                path: self.path,
                v,
                at: format!("{}.", self.key(k)),
            }),
            _ => Err(self.err(format!("{} is missing or not an object", self.key(k)))),
        }
    }
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k).filter(|v| !v.is_null())
    }
    pub fn usize(&self, k: &str) -> Result<usize, HfError> {
        self.get(k)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| self.err(format!("{} is missing or not a whole number", self.key(k))))
    }
    pub fn usize_or(&self, k: &str, default: usize) -> Result<usize, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(_) => self.usize(k),
        }
    }
    pub fn f64_or(&self, k: &str, default: f64) -> Result<f64, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("{} is not a number", self.key(k)))),
        }
    }
    pub fn str_or(&self, k: &str, default: &'a str) -> Result<&'a str, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(format!("{} is not a string", self.key(k)))),
        }
    }
    /// Key `k` (or `default` when absent) must read `want`; anything else is refused as
    /// unsupported, saying `why`.
    pub fn require_str(
        &self,
        k: &str,
        default: &'a str,
        want: &str,
        why: &str,
    ) -> Result<(), HfError> {
        let found = self.str_or(k, default)?;
        if found == want {
            Ok(())
        } else {
            Err(self.unsupported(k, format!("{found:?}"), why))
        }
    }
    pub fn bool_or(&self, k: &str, default: bool) -> Result<bool, HfError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("{} is not true/false", self.key(k)))),
        }
    }
    /// A token id; a list (several EOS ids) gives its first.
    pub fn token(&self, k: &str) -> Result<Option<u32>, HfError> {
        let v = match self.get(k) {
            None => return Ok(None),
            Some(Value::Array(a)) => a.first(),
            Some(v) => Some(v),
        };
        v.map(|v| {
            v.as_u64()
                .map(|n| n as u32)
                .ok_or_else(|| self.err(format!("{} is not a token id", self.key(k))))
        })
        .transpose()
    }
    pub fn unsupported(&self, k: &str, found: impl std::fmt::Display, why: &str) -> HfError {
        self.err(format!("unsupported {} = {found}: {why}", self.key(k)))
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| HfError::Config {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}
