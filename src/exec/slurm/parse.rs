//! Reading what Slurm's client tools print.
//!
//! The Slurm executor learns about its jobs only through `sbatch --parsable`,
//! `squeue -o` and `scontrol show job -o`; these pure functions turn their
//! output into typed values so that the state mapping can be tested on
//! captured real outputs (the `fixtures/` beside this file, taken from the
//! one-node cluster of `scripts/slurm-local.sh`, Slurm 22.05).

use std::collections::BTreeMap;
use std::time::Duration;

/// The `squeue -o` format the executor asks for, matching [`parse_squeue`].
pub const SQUEUE_FORMAT: &str = "%i|%T|%r|%N|%M";

/// A job's state as Slurm names it (`JobState=` / `squeue %T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    /// Suspended, configuring, completing, requeued...: alive, not yet ended.
    Other(String),
    Completed,
    Failed,
    Cancelled,
    Timeout,
    OutOfMemory,
    NodeFail,
    Preempted,
    /// Boot failure, deadline...: ended without running to completion.
    OtherEnded(String),
}

impl JobState {
    pub fn parse(s: &str) -> JobState {
        // `scontrol` may append flags to the state (`CANCELLED by 0`), so look at the first word.
        let word = s.split_whitespace().next().unwrap_or("");
        match word {
            "PENDING" => JobState::Pending,
            "RUNNING" => JobState::Running,
            "COMPLETED" => JobState::Completed,
            "FAILED" => JobState::Failed,
            "CANCELLED" => JobState::Cancelled,
            "TIMEOUT" => JobState::Timeout,
            "OUT_OF_MEMORY" => JobState::OutOfMemory,
            "NODE_FAIL" => JobState::NodeFail,
            "PREEMPTED" => JobState::Preempted,
            "BOOT_FAIL" | "DEADLINE" | "SPECIAL_EXIT" => JobState::OtherEnded(word.to_string()),
            other => JobState::Other(other.to_string()),
        }
    }

    /// Whether the job has ended for good (with `--no-requeue`).
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            JobState::Pending | JobState::Running | JobState::Other(_)
        )
    }

    pub fn name(&self) -> &str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::Timeout => "TIMEOUT",
            JobState::OutOfMemory => "OUT_OF_MEMORY",
            JobState::NodeFail => "NODE_FAIL",
            JobState::Preempted => "PREEMPTED",
            JobState::Other(s) | JobState::OtherEnded(s) => s,
        }
    }
}

/// One line of `squeue -h -t all -o SQUEUE_FORMAT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRow {
    pub job_id: String,
    pub state: JobState,
    /// Slurm's reason (`None`, `Dependency`, `DependencyNeverSatisfied`, `NonZeroExitCode`...).
    pub reason: String,
    /// Where it runs or ran; `None` while pending or if it never ran.
    pub node: Option<String>,
    /// Run time so far (`squeue %M`).
    pub elapsed: Option<Duration>,
}

/// Parses `squeue` output in [`SQUEUE_FORMAT`]; lines that do not fit are
/// returned as errors rather than guessed at.
pub fn parse_squeue(out: &str) -> Result<Vec<QueueRow>, String> {
    let mut rows = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.splitn(5, '|').collect();
        let [id, state, reason, node, elapsed] = f[..] else {
            return Err(format!("unexpected squeue line `{line}`"));
        };
        if id.is_empty() {
            return Err(format!("unexpected squeue line `{line}`"));
        }
        rows.push(QueueRow {
            job_id: id.to_string(),
            state: JobState::parse(state),
            reason: reason.to_string(),
            node: non_null(node).map(str::to_string),
            elapsed: parse_duration(elapsed),
        });
    }
    Ok(rows)
}

/// One job as `scontrol show job -o ID` prints it: `Key=Value` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDetail {
    pub fields: BTreeMap<String, String>,
}

impl JobDetail {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str).and_then(non_null)
    }

    pub fn state(&self) -> Option<JobState> {
        self.get("JobState").map(JobState::parse)
    }

    pub fn reason(&self) -> Option<&str> {
        self.get("Reason")
    }

    pub fn node(&self) -> Option<&str> {
        self.get("NodeList")
    }

    /// The script's exit status and the signal that ended it (`ExitCode=3:0`).
    pub fn exit_code(&self) -> Option<(i32, i32)> {
        let (code, sig) = self.get("ExitCode")?.split_once(':')?;
        Some((code.parse().ok()?, sig.parse().ok()?))
    }

    pub fn run_time(&self) -> Option<Duration> {
        self.get("RunTime").and_then(parse_duration)
    }

    /// Job ids named in the `Dependency=` field (`afterok:8(failed),afterok:9(unfulfilled)`).
    pub fn dependency_ids(&self) -> Vec<String> {
        let Some(dep) = self.get("Dependency") else {
            return Vec::new();
        };
        dep.split([',', '?'])
            .flat_map(|part| part.split(':').skip(1))
            .map(|id| id.split('(').next().unwrap_or("").to_string())
            .filter(|id| !id.is_empty())
            .collect()
    }
}

/// Parses one-line `scontrol show job -o` output. Values may contain spaces
/// (paths, reasons), so a word that does not start a new `Key=` continues the
/// previous value.
pub fn parse_scontrol_job(out: &str) -> Result<JobDetail, String> {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for word in line.split(' ').filter(|w| !w.is_empty()) {
        match word.split_once('=') {
            Some((key, value)) if is_key(key) => {
                fields.insert(key.to_string(), value.to_string());
                last = Some(key.to_string());
            }
            _ => match last.as_ref().and_then(|k| fields.get_mut(k)) {
                Some(v) => {
                    v.push(' ');
                    v.push_str(word);
                }
                None => return Err(format!("unexpected scontrol output `{line}`")),
            },
        }
    }
    if !fields.contains_key("JobId") {
        return Err(format!("no JobId in scontrol output `{line}`"));
    }
    Ok(JobDetail { fields })
}

/// Parses `sbatch --parsable` output: `ID` or `ID;CLUSTER`.
pub fn parse_sbatch(out: &str) -> Result<String, String> {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let id = line.split(';').next().unwrap_or("");
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        Ok(id.to_string())
    } else {
        Err(format!("unexpected sbatch output `{}`", out.trim()))
    }
}

/// Slurm's `[D-]HH:MM:SS`, `MM:SS` or `SS` durations; `None` for `UNLIMITED`, `N/A`...
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let mut secs = 0u64;
    let parts: Vec<&str> = rest.split(':').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    for p in parts {
        secs = secs * 60 + p.parse::<u64>().ok()?;
    }
    Some(Duration::from_secs(days * 86_400 + secs))
}

fn is_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '/'))
}

fn non_null(s: &str) -> Option<&str> {
    match s.trim() {
        "" | "(null)" | "N/A" | "Unknown" => None,
        v => Some(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("fixtures/", $name))
        };
    }

    #[test]
    fn squeue_chain_with_a_failure() {
        let rows = parse_squeue(fixture!("squeue_chain_done.txt")).unwrap();
        let by_id: BTreeMap<_, _> = rows.iter().map(|r| (r.job_id.as_str(), r)).collect();
        assert_eq!(by_id["7"].state, JobState::Completed);
        assert_eq!(by_id["7"].node.as_deref(), Some("vm"));
        assert_eq!(by_id["7"].elapsed, Some(Duration::from_secs(1)));
        assert_eq!(by_id["8"].state, JobState::Failed);
        assert_eq!(by_id["8"].reason, "NonZeroExitCode");
        assert_eq!(by_id["9"].state, JobState::Cancelled);
        assert_eq!(by_id["9"].reason, "DependencyNeverSatisfied");
        assert_eq!(by_id["9"].node, None);
        assert!(rows.iter().all(|r| r.state.is_final()));
    }

    #[test]
    fn squeue_pending_and_running() {
        let rows = parse_squeue(fixture!("squeue_mixed_running.txt")).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].state, JobState::Pending);
        assert_eq!(rows[0].reason, "Dependency");
        assert_eq!(rows[1].state, JobState::Running);
        assert!(!rows[0].state.is_final() && !rows[1].state.is_final());
        let early = parse_squeue(fixture!("squeue_chain_running.txt")).unwrap();
        assert_eq!(early.len(), 4);
    }

    #[test]
    fn squeue_cancelled_by_user_keeps_its_reason() {
        let rows = parse_squeue(fixture!("squeue_cancelled.txt")).unwrap();
        assert_eq!(rows[0].state, JobState::Cancelled);
        assert_eq!(rows[0].reason, "None");
        assert_eq!(rows[1].reason, "Dependency");
    }

    #[test]
    fn squeue_rejects_other_formats() {
        assert!(parse_squeue("JOBID PARTITION NAME\n").is_err());
        assert_eq!(parse_squeue("\n").unwrap(), vec![]);
    }

    #[test]
    fn scontrol_failed_job() {
        let d = parse_scontrol_job(fixture!("scontrol_failed.txt")).unwrap();
        assert_eq!(d.state(), Some(JobState::Failed));
        assert_eq!(d.reason(), Some("NonZeroExitCode"));
        assert_eq!(d.exit_code(), Some((3, 0)));
        assert_eq!(d.node(), Some("vm"));
        assert_eq!(d.get("JobName"), Some("B"));
        assert_eq!(d.get("StdOut"), Some("/tmp/sl/b.log"));
        assert_eq!(d.get("ReqNodeList"), None);
    }

    #[test]
    fn scontrol_cancelled_dependent_names_its_dependency() {
        let d = parse_scontrol_job(fixture!("scontrol_dependency_never_satisfied.txt")).unwrap();
        assert_eq!(d.state(), Some(JobState::Cancelled));
        assert_eq!(d.reason(), Some("DependencyNeverSatisfied"));
        assert_eq!(d.dependency_ids(), vec!["8".to_string()]);
        assert_eq!(d.node(), None);
    }

    #[test]
    fn scontrol_cancelled_running_job_was_signalled() {
        let d = parse_scontrol_job(fixture!("scontrol_cancelled_running.txt")).unwrap();
        assert_eq!(d.state(), Some(JobState::Cancelled));
        assert_eq!(d.exit_code(), Some((0, 15)));
        let p = parse_scontrol_job(fixture!("scontrol_cancelled_pending.txt")).unwrap();
        assert_eq!(p.reason(), Some("Dependency"));
        let c = parse_scontrol_job(fixture!("scontrol_completed.txt")).unwrap();
        assert_eq!(c.state(), Some(JobState::Completed));
        assert_eq!(c.run_time(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn scontrol_values_with_spaces() {
        let d =
            parse_scontrol_job("JobId=5 JobName=x WorkDir=/a b/c StdOut=/o Reason=None").unwrap();
        assert_eq!(d.get("WorkDir"), Some("/a b/c"));
        assert!(parse_scontrol_job("slurm_load_jobs error: Invalid job id specified").is_err());
    }

    #[test]
    fn sbatch_and_durations() {
        assert_eq!(parse_sbatch("42\n").unwrap(), "42");
        assert_eq!(parse_sbatch("42;cluster\n").unwrap(), "42");
        assert!(parse_sbatch("sbatch: error: Batch job submission failed").is_err());
        assert_eq!(
            parse_duration("1-02:03:04"),
            Some(Duration::from_secs(93_784))
        );
        assert_eq!(parse_duration("0:15"), Some(Duration::from_secs(15)));
        assert_eq!(parse_duration("UNLIMITED"), None);
    }
}
