//! `ecic eval`: score a predictions file against a references file, print a
//! table (×100) or one JSON object (raw scale), optionally with bootstrap
//! intervals and a paired comparison with a second predictions file.

use std::io::Write;
use std::path::{Path, PathBuf};

use comfy_table::{presets, Cell, CellAlignment, Table};
use serde_json::{json, Map, Value};

use super::bootstrap::{self, Interval, Paired};
use super::jsonl::{self, InputError, RefRecord};
use super::{Evaluation, Metric, References, Tokenize};
use crate::error::{CliError, CliResult};

/// Most `--bootstrap` resamples (each is a pass over every image's scores).
const MAX_RESAMPLES: usize = 100_000;

/// Resamples of a paired comparison when `--bootstrap` is not given.
const DEFAULT_PAIRED_RESAMPLES: usize = 1000;

/// Score predicted captions against references (BLEU-1..4, ROUGE-L, CIDEr-D
/// as pycocoevalcap 1.2 computes them on the tokenized strings).
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Predictions: one `{"image_id": str, "text": str}` per line.
    #[arg(long, value_name = "PRED.jsonl")]
    pub pred: PathBuf,
    /// References: one `{"image_id": str, "text": [str, ...]}` per line.
    #[arg(long, value_name = "REFS.jsonl")]
    pub refs: PathBuf,
    /// How captions are cut into tokens before scoring.
    #[arg(long, value_enum, default_value_t = Tokenize::Char)]
    pub tokenize: Tokenize,
    /// Print one JSON object (raw pycocoevalcap scale) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write every image's scores (and BLEU counts) as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    pub per_image: Option<PathBuf>,
    /// A second predictions file: paired bootstrap test of PRED against it.
    #[arg(long, value_name = "PRED_B.jsonl")]
    pub compare: Option<PathBuf>,
    /// Bootstrap resamples for 95% intervals (default 0, or 1000 with --compare).
    #[arg(long, value_name = "N")]
    pub bootstrap: Option<usize>,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Score reference images without a prediction as empty captions.
    #[arg(long)]
    pub allow_missing: bool,
}

fn usage(e: InputError) -> CliError {
    CliError::Usage(e.to_string())
}

/// One scored predictions file.
struct Scored {
    path: PathBuf,
    eval: Evaluation,
    missing: usize,
    intervals: Option<Vec<Interval>>,
}

pub fn run(args: &EvalArgs) -> CliResult {
    crate::alloc::return_freed_memory_soon();
    crate::alloc::avoid_huge_pages();
    let (refs, pred) = rayon::join(
        || jsonl::read_references(&args.refs),
        || jsonl::read_predictions(&args.pred),
    );
    let (refs, pred) = match (refs, pred) {
        (Ok(r), Ok(p)) => (r, p),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => return Err(usage(e)),
        (Err(a), Err(b)) => return Err(CliError::Usage(format!("{a}\n{b}"))),
    };
    let pred_b = args
        .compare
        .as_deref()
        .map(jsonl::read_predictions)
        .transpose()
        .map_err(usage)?;
    let aligned =
        jsonl::align(&refs, &args.refs, &pred, &args.pred, args.allow_missing).map_err(usage)?;
    let aligned_b = match (&pred_b, &args.compare) {
        (Some(b), Some(path)) => {
            Some(jsonl::align(&refs, &args.refs, b, path, args.allow_missing).map_err(usage)?)
        }
        _ => None,
    };
    let references = prepare(refs, args.tokenize)?;
    let failed = |e: super::MetricsError| CliError::Other(e.into());
    if args.bootstrap.is_some_and(|n| n > MAX_RESAMPLES) {
        return Err(CliError::usage(format!(
            "--bootstrap {}: over the limit of {MAX_RESAMPLES} resamples",
            args.bootstrap.unwrap_or_default()
        )));
    }
    let resamples = args.bootstrap.unwrap_or(if args.compare.is_some() {
        DEFAULT_PAIRED_RESAMPLES
    } else {
        0
    });
    let score = |path: &Path, texts: &[&str], missing: usize| -> CliResult<Scored> {
        let eval = references.evaluate_in_order(texts).map_err(failed)?;
        let intervals = (resamples > 0)
            .then(|| bootstrap::confidence_interval(&eval.images, resamples, args.seed))
            .transpose()
            .map_err(failed)?;
        Ok(Scored {
            path: path.to_path_buf(),
            eval,
            missing,
            intervals,
        })
    };
    let a = score(&args.pred, &aligned.texts, aligned.missing)?;
    let b = match (&aligned_b, &args.compare) {
        (Some(al), Some(path)) => Some(score(path, &al.texts, al.missing)?),
        _ => None,
    };
    let paired = match &b {
        Some(b) if resamples > 0 => Some(
            bootstrap::paired(&a.eval.images, &b.eval.images, resamples, args.seed)
                .map_err(failed)?,
        ),
        _ => None,
    };
    if let Some(path) = &args.per_image {
        write_per_image(path, &a.eval).map_err(CliError::Other)?;
    }
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        let v = json_report(args, resamples, &a, b.as_ref(), paired.as_deref());
        serde_json::to_string(&v).map_err(|e| CliError::Other(e.into()))?
    } else {
        table_report(args, resamples, &a, b.as_ref(), paired.as_deref())
    };
    writeln!(out, "{text}").map_err(|e| CliError::Other(e.into()))?;
    Ok(())
}

fn prepare(refs: Vec<RefRecord>, mode: Tokenize) -> CliResult<References> {
    let pairs: Vec<(String, Vec<String>)> =
        refs.into_iter().map(|r| (r.image_id, r.text)).collect();
    // ids and lists were checked line by line already; anything left is a bug
    References::from_owned(pairs, mode).map_err(|e| CliError::Other(e.into()))
}

fn write_per_image(path: &Path, eval: &Evaluation) -> anyhow::Result<()> {
    use anyhow::Context;
    let file = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for im in &eval.images {
        serde_json::to_writer(&mut w, im)?;
        w.write_all(b"\n")?;
    }
    w.flush()
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

fn intervals_json(intervals: &[Interval]) -> Value {
    let m: Map<String, Value> = intervals
        .iter()
        .map(|i| {
            (
                i.metric.key().to_string(),
                json!({"low": i.low, "high": i.high}),
            )
        })
        .collect();
    Value::Object(m)
}

fn scores_json(s: &Scored, tokenize: Tokenize) -> Map<String, Value> {
    let mut m = match serde_json::to_value(s.eval.scores) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    m.insert("tokenize".into(), json!(tokenize.as_str()));
    m.insert("missing".into(), json!(s.missing));
    m.insert("pred".into(), json!(s.path.display().to_string()));
    if let Some(iv) = &s.intervals {
        m.insert("intervals".into(), intervals_json(iv));
    }
    m
}

fn json_report(
    args: &EvalArgs,
    resamples: usize,
    a: &Scored,
    b: Option<&Scored>,
    paired: Option<&[Paired]>,
) -> Value {
    let mut top = scores_json(a, args.tokenize);
    if resamples > 0 {
        top.insert(
            "bootstrap".into(),
            json!({"resamples": resamples, "seed": args.seed, "level": bootstrap::LEVEL}),
        );
    }
    if let Some(b) = b {
        let mut cmp = scores_json(b, args.tokenize);
        if let Some(p) = paired {
            let m: Map<String, Value> = p
                .iter()
                .map(|x| {
                    let v = json!({"delta": x.delta, "low": x.low, "high": x.high, "p_value": x.p_value});
                    (x.metric.key().to_string(), v)
                })
                .collect();
            cmp.insert("paired".into(), Value::Object(m));
        }
        top.insert("compare".into(), Value::Object(cmp));
    }
    Value::Object(top)
}

fn x100(v: f64) -> Cell {
    Cell::new(format!("{:.2}", v * 100.0)).set_alignment(CellAlignment::Right)
}

fn range100(low: f64, high: f64) -> Cell {
    Cell::new(format!("[{:.2}, {:.2}]", low * 100.0, high * 100.0))
        .set_alignment(CellAlignment::Right)
}

fn table_report(
    args: &EvalArgs,
    resamples: usize,
    a: &Scored,
    b: Option<&Scored>,
    paired: Option<&[Paired]>,
) -> String {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    let ci = |s: &Scored, m: Metric| {
        s.intervals
            .as_ref()
            .and_then(|iv| iv.iter().find(|i| i.metric == m))
            .map(|i| range100(i.low, i.high))
    };
    match (b, paired) {
        (Some(b), Some(paired)) => {
            table.set_header(vec![
                "metric (×100)",
                "A",
                "B",
                "A − B",
                "95% CI of A − B",
                "p-value (A ≤ B)",
            ]);
            for p in paired {
                table.add_row(vec![
                    Cell::new(p.metric.label()),
                    x100(p.a),
                    x100(p.b),
                    x100(p.delta),
                    range100(p.low, p.high),
                    Cell::new(format!("{:.4}", p.p_value)).set_alignment(CellAlignment::Right),
                ]);
            }
            let _ = b;
        }
        _ => {
            let mut header = vec!["metric (×100)", "score"];
            if a.intervals.is_some() {
                header.push("95% CI");
            }
            table.set_header(header);
            for m in Metric::ALL {
                let mut row = vec![Cell::new(m.label()), x100(a.eval.scores.get(m))];
                row.extend(ci(a, m));
                table.add_row(row);
            }
        }
    }
    let mut lines = vec![format!(
        "{} images, tokenize {}{}",
        a.eval.scores.images,
        args.tokenize,
        if a.missing > 0 {
            format!(", {} without prediction scored as empty", a.missing)
        } else {
            String::new()
        }
    )];
    if let Some(b) = b {
        lines.push(format!(
            "A = {}, B = {}",
            a.path.display(),
            b.path.display()
        ));
    }
    if resamples > 0 {
        lines.push(format!(
            "bootstrap: {resamples} resamples, seed {}",
            args.seed
        ));
    }
    lines.push(table.to_string());
    lines.join("\n")
}
