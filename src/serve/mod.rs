//! `ecic serve`: a model behind HTTP, on axum and tokio.
//!
//! - `POST /v1/captions`: images (multipart parts, or base64 in JSON; see [`request`]) and
//!   optional decoding options in, `{"captions": [{"id", "caption"}, ...]}` out.
//! - `POST /v1/jobs` (same body) answers `202 {"id"}` at once; `GET /v1/jobs/{id}` its state
//!   and progress, then its captions ([`jobs`]).
//! - `GET /healthz`: `{"status": "ok", "model": ...}` once the model is loaded.
//! - `GET /metrics`: requests, latency, batch sizes, queue depth ([`metrics`]).
//!
//! Every image goes through one bounded queue to one batcher thread ([`batcher`]), which
//! decodes up to `--max-batch` images together, waiting at most `--max-wait-ms` for a batch
//! to fill. Limits answer instead of queueing without end: a full queue 503 with
//! `Retry-After`, a body over the limit or more images than a request may carry 413, a
//! part that is not a decodable image 400 naming the part. Nothing in a request reaches the
//! filesystem: images are decoded in memory. SIGTERM or Ctrl-C stops accepting
//! connections, lets the requests in flight finish, and exits 0 (jobs still running are
//! abandoned: they live in memory).

pub mod batcher;
pub mod jobs;
pub mod metrics;
pub mod request;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::oneshot;

use crate::error::{CliError, CliResult};
use crate::infer::cmd::{cli_err, DecodeArgs};
use crate::infer::Predictor;

use batcher::{BatchOptions, Queue, Work};
use jobs::{Caption, Jobs};
use metrics::Metrics;
use request::Refusal;

/// `ecic serve`: the model behind HTTP.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// SWEEP/CELL, SWEEP:best, an `ecic export` directory or a training stage's cache entry.
    pub model: String,
    /// Address to listen on (loopback by default; port 0 picks a free port, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Most images decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Longest wait for a batch to fill once its first image is queued, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Images that may wait in the queue; beyond, requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Largest request body of /v1/captions, in bytes (beyond: 413).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Most images in one /v1/captions request (beyond: 413; use /v1/jobs).
    #[arg(long, default_value_t = 64)]
    pub max_images: usize,
    /// Largest request body of /v1/jobs, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_job_body_bytes: usize,
    /// Most images in one job.
    #[arg(long, default_value_t = 10_000)]
    pub max_job_images: usize,
    /// Most jobs held at once (running or finished and not yet expired).
    #[arg(long, default_value_t = 16)]
    pub max_jobs: usize,
    /// Seconds a finished job's captions are kept.
    #[arg(long, default_value_t = 600)]
    pub job_ttl_s: u64,
    /// The runs directory whose store and cache hold SWEEP/CELL.
    #[arg(long, default_value = "runs", env = "ECIC_RUNS")]
    pub runs: PathBuf,
}

struct AppState {
    predictor: Arc<Predictor>,
    queue: Arc<Queue>,
    jobs: Arc<Jobs>,
    metrics: Arc<Metrics>,
    opts: ServeArgs,
}

type Shared = Arc<AppState>;

pub fn run(a: &ServeArgs) -> CliResult {
    if a.max_batch == 0 || a.queue == 0 || a.max_images == 0 {
        return Err(CliError::usage(
            "--max-batch, --queue and --max-images must be at least 1",
        ));
    }
    if a.max_images > a.queue {
        return Err(CliError::usage(format!(
            "--max-images {} is more than --queue {}: such a request could never be queued",
            a.max_images, a.queue
        )));
    }
    let predictor = Arc::new(Predictor::load(&a.model, &a.runs).map_err(cli_err)?);
    eprintln!("model: {}", predictor.origin);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .map_err(|e| CliError::Other(anyhow::Error::new(e)))?;
    rt.block_on(serve(predictor, a))
}

async fn serve(predictor: Arc<Predictor>, a: &ServeArgs) -> CliResult {
    let metrics = Arc::new(Metrics::new(a.max_batch));
    let (queue, batcher) = batcher::start(
        predictor.clone(),
        BatchOptions {
            max_batch: a.max_batch,
            max_wait: Duration::from_millis(a.max_wait_ms),
            capacity: a.queue,
        },
        metrics.clone(),
    );
    let state: Shared = Arc::new(AppState {
        predictor,
        queue: queue.clone(),
        jobs: Arc::new(Jobs::new(a.max_jobs, Duration::from_secs(a.job_ttl_s))),
        metrics,
        opts: ServeArgs {
            model: a.model.clone(),
            runs: a.runs.clone(),
            ..*a
        },
    });
    let app = Router::new()
        .route(
            "/v1/captions",
            post(captions).layer(DefaultBodyLimit::max(a.max_body_bytes)),
        )
        .route(
            "/v1/jobs",
            post(create_job).layer(DefaultBodyLimit::max(a.max_job_body_bytes)),
        )
        .route("/v1/jobs/{id}", get(job_status))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(a.addr)
        .await
        .map_err(|e| CliError::usage(format!("binding {}: {e}", a.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::Other(anyhow::Error::new(e)))?;
    // Tests and scripts read this line for the port.
    println!("listening on http://{local}");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| CliError::Other(anyhow::Error::new(e)))?;
    eprintln!("shutting down: requests in flight answered");
    queue.close();
    tokio::task::spawn_blocking(move || batcher.join())
        .await
        .ok();
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn refuse(r: Refusal) -> Response {
    let mut resp = (r.status, Json(json!({ "error": r.message }))).into_response();
    if r.status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    if r.status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was never read: the connection cannot carry another request,
        // and a client that does not know it would send its next one into a closed socket.
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    resp
}

fn queue_full(what: &str) -> Refusal {
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("{what}; retry later"),
    }
}

/// Reads, checks and prepares a request's images, with the decoding it asks for.
async fn read_images(
    st: &Shared,
    req: Request,
    max_images: usize,
    route: &str,
) -> Result<(Vec<(String, Vec<f32>)>, crate::decode::DecodeConfig, u64), Refusal> {
    let parsed = request::parse(req).await?;
    if parsed.parts.is_empty() {
        return Err(Refusal::bad("no images in the request"));
    }
    if parsed.parts.len() > max_images {
        return Err(Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "{} images; {route} takes at most {max_images} per request{}",
                parsed.parts.len(),
                if route == "/v1/captions" {
                    " (post larger batches to /v1/jobs)"
                } else {
                    ""
                }
            ),
        });
    }
    let (cfg, seed) = decoding(&st.predictor, &parsed.options)?;
    let spec = st.predictor.image.clone();
    let parts = parsed.parts;
    let images = tokio::task::spawn_blocking(move || request::prepare(parts, &spec))
        .await
        .map_err(|_| Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "decoding the images failed".into(),
        })??;
    Ok((images, cfg, seed))
}

fn decoding(p: &Predictor, o: &DecodeArgs) -> Result<(crate::decode::DecodeConfig, u64), Refusal> {
    let cfg = o
        .apply(&p.decoding)
        .map_err(|e| Refusal::bad(format!("options: {e}")))?;
    Ok((cfg, o.seed.unwrap_or(p.seed)))
}

async fn captions(State(st): State<Shared>, req: Request) -> Response {
    let t0 = Instant::now();
    let (status, resp) = match caption_request(&st, req).await {
        Ok(c) => (
            StatusCode::OK,
            Json(json!({ "captions": c })).into_response(),
        ),
        Err(r) => (r.status, refuse(r)),
    };
    st.metrics
        .observe("/v1/captions", status.as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn caption_request(st: &Shared, req: Request) -> Result<Vec<Caption>, Refusal> {
    let (images, cfg, seed) = read_images(st, req, st.opts.max_images, "/v1/captions").await?;
    let mut receivers = Vec::with_capacity(images.len());
    {
        let Some(mut slots) = st.queue.reserve(images.len()) else {
            return Err(queue_full(&format!(
                "the queue is full ({} of {} images waiting)",
                st.queue.depth(),
                st.queue.capacity
            )));
        };
        for (id, px) in images {
            let (tx, rx) = oneshot::channel();
            if !slots.push(Work {
                pixels: px,
                cfg: cfg.clone(),
                seed,
                reply: tx,
            }) {
                return Err(queue_full("the server is shutting down"));
            }
            receivers.push((id, rx));
        }
    }
    st.metrics.queue_depth.set(st.queue.depth() as i64);
    let mut out = Vec::with_capacity(receivers.len());
    for (id, rx) in receivers {
        match rx.await {
            Ok(Ok(caption)) => out.push(Caption { id, caption }),
            Ok(Err(e)) => {
                return Err(Refusal {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: e,
                })
            }
            Err(_) => return Err(queue_full("the server is shutting down")),
        }
    }
    st.metrics.images.inc_by(out.len() as u64);
    Ok(out)
}

async fn create_job(State(st): State<Shared>, req: Request) -> Response {
    let t0 = Instant::now();
    let result = async {
        let (images, cfg, seed) = read_images(&st, req, st.opts.max_job_images, "/v1/jobs").await?;
        let Some(id) = st.jobs.create(images.len()) else {
            return Err(queue_full(&format!(
                "{} jobs are held, the most this server keeps",
                st.jobs.max_jobs
            )));
        };
        st.metrics.jobs.set(st.jobs.expire() as i64);
        let total = images.len();
        tokio::spawn(jobs::run(
            st.jobs.clone(),
            st.queue.clone(),
            jobs::JobWork {
                id: id.clone(),
                images,
                cfg,
                seed,
            },
            st.opts.max_batch,
            Duration::from_millis(st.opts.max_wait_ms.max(10)),
        ));
        Ok((id, total))
    }
    .await;
    let (status, resp) = match result {
        Ok((id, total)) => (
            StatusCode::ACCEPTED,
            (
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "total": total, "status_url": format!("/v1/jobs/{id}") })),
            )
                .into_response(),
        ),
        Err(r) => (r.status, refuse(r)),
    };
    st.metrics
        .observe("/v1/jobs", status.as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn job_status(State(st): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let t0 = Instant::now();
    let (status, resp) = match st.jobs.view(&id) {
        Some(v) => (StatusCode::OK, Json(v).into_response()),
        None => (
            StatusCode::NOT_FOUND,
            refuse(Refusal {
                status: StatusCode::NOT_FOUND,
                message: format!("no job {id} (never created, or expired)"),
            }),
        ),
    };
    st.metrics
        .observe("/v1/jobs/{id}", status.as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn healthz(State(st): State<Shared>) -> Response {
    Json(json!({ "status": "ok", "model": st.predictor.origin })).into_response()
}

async fn metrics_text(State(st): State<Shared>) -> Response {
    st.metrics.queue_depth.set(st.queue.depth() as i64);
    st.metrics.jobs.set(st.jobs.expire() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}
