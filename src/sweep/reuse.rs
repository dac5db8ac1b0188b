//! Trusting the cache before a sweep reuses it.
//!
//! A sweep reuses an entry's content in two ways: a stage it runs reads it as
//! an input (directly, or through a model lineage: every cached ancestor of a
//! stage to run), or the store imports its results because it does not have
//! them (a deleted store, a stage computed by another process). Those entries,
//! and only those, are verified before anything runs, so a fully cached
//! re-run reads no entry at all. A damaged one is moved into
//! `runs/quarantine/` and becomes a cache miss: its stage runs again.

use std::collections::HashSet;

use crate::cache::{Cache, Quarantined};
use crate::plan::{Plan, Sealed};

use super::SweepError;

/// Verify the cached entries a sweep will reuse the content of (see the module
/// docs); damaged ones are quarantined and removed from `cached`. Quarantining
/// turns a hit into a stage to run, whose cached inputs must then be verified
/// too: repeat until nothing new is damaged.
pub fn check_reused(
    cache: &Cache,
    plan: &Plan<Sealed>,
    cached: &mut HashSet<String>,
    ingested: &HashSet<String>,
) -> Result<Vec<Quarantined>, SweepError> {
    let mut verified: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    loop {
        // Cached ancestors of every stage to run, and cached stages the store lacks.
        let mut todo: Vec<String> = plan
            .stages()
            .filter(|s| !cached.contains(&s.desc.key))
            .flat_map(|s| plan.ancestors(&s.desc.key))
            .map(|n| &n.desc.key)
            .filter(|k| cached.contains(*k))
            .cloned()
            .collect();
        todo.extend(
            plan.stages()
                .map(|s| &s.desc.key)
                .filter(|k| cached.contains(*k) && !ingested.contains(*k))
                .cloned(),
        );
        todo.retain(|k| !verified.contains(k));
        todo.sort();
        todo.dedup();
        if todo.is_empty() {
            return Ok(out);
        }
        for key in todo {
            verified.insert(key.clone());
            if let Err(damage) = cache.verify(&key) {
                let q = cache.quarantine(&key, damage)?;
                let label = plan.get(&key).map(|n| n.desc.label.as_str()).unwrap_or("");
                match &q.moved_to {
                    Some(to) => eprintln!(
                        "cache: {label} [{}] is damaged ({}); moved to {}; computing it again",
                        &key[..12],
                        q.damage,
                        to.display()
                    ),
                    None => eprintln!(
                        "cache: {label} [{}] is damaged ({}); another process is on it",
                        &key[..12],
                        q.damage
                    ),
                }
                cached.remove(&key);
                out.push(q);
            }
        }
    }
}
