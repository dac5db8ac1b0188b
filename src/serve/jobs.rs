//! Asynchronous jobs: a large batch posted once, captioned in the background, fetched later.
//!
//! A job feeds its images to the same queue as direct requests, `max_batch` at a time (so it
//! never holds more than one batch's slots and direct requests keep their turn), waiting for
//! free slots when the queue is full instead of failing. The table is bounded (`max_jobs`);
//! a finished job is kept for `ttl` after it ended, then forgotten (404). Jobs live in
//! memory: a restarted server has none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::decode::DecodeConfig;

use super::batcher::{Queue, Work};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Caption {
    pub id: String,
    pub caption: String,
}

/// What `GET /v1/jobs/{id}` answers.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    pub done: usize,
    pub total: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captions: Option<Vec<Caption>>,
}

struct Job {
    view: JobView,
    all: Vec<Caption>,
    ended: Option<Instant>,
}

/// The job table.
pub struct Jobs {
    table: Mutex<HashMap<String, Job>>,
    pub max_jobs: usize,
    pub ttl: Duration,
}

impl Jobs {
    pub fn new(max_jobs: usize, ttl: Duration) -> Jobs {
        Jobs {
            table: Mutex::new(HashMap::new()),
            max_jobs,
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets finished jobs older than the ttl; returns how many jobs are held.
    pub fn expire(&self) -> usize {
        let mut t = self.lock();
        let ttl = self.ttl;
        t.retain(|_, j| j.ended.is_none_or(|e| e.elapsed() < ttl));
        t.len()
    }

    /// A new job of `total` images, or `None` when the table is full.
    pub fn create(&self, total: usize) -> Option<String> {
        self.expire();
        let mut t = self.lock();
        if t.len() >= self.max_jobs {
            return None;
        }
        let id = format!("{:032x}", rand::random::<u128>());
        t.insert(
            id.clone(),
            Job {
                view: JobView {
                    id: id.clone(),
                    state: JobState::Queued,
                    done: 0,
                    total,
                    error: None,
                    captions: None,
                },
                all: Vec::with_capacity(total),
                ended: None,
            },
        );
        Some(id)
    }

    pub fn view(&self, id: &str) -> Option<JobView> {
        self.expire();
        self.lock().get(id).map(|j| {
            let mut v = j.view.clone();
            if v.state == JobState::Done {
                v.captions = Some(j.all.clone());
            }
            v
        })
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Some(j) = self.lock().get_mut(id) {
            f(j);
        }
    }
}

/// One job's work: its images (id, prepared pixels) and how to decode them.
pub struct JobWork {
    pub id: String,
    pub images: Vec<(String, Vec<f32>)>,
    pub cfg: DecodeConfig,
    pub seed: u64,
}

/// Runs a job to its end: its images through the queue, `chunk` at a time, waiting `poll`
/// whenever the queue is full.
pub async fn run(jobs: Arc<Jobs>, queue: Arc<Queue>, work: JobWork, chunk: usize, poll: Duration) {
    let JobWork {
        id,
        images,
        cfg,
        seed,
    } = work;
    jobs.update(&id, |j| j.view.state = JobState::Running);
    let mut images = images.into_iter();
    loop {
        let part: Vec<(String, Vec<f32>)> = images.by_ref().take(chunk.max(1)).collect();
        if part.is_empty() {
            break;
        }
        let receivers = loop {
            if let Some(mut slots) = queue.reserve(part.len()) {
                let mut rx = Vec::with_capacity(part.len());
                let mut closed = false;
                for (_, px) in &part {
                    let (tx, r) = oneshot::channel();
                    closed |= !slots.push(Work {
                        pixels: px.clone(),
                        cfg: cfg.clone(),
                        seed,
                        reply: tx,
                    });
                    rx.push(r);
                }
                if closed {
                    fail(&jobs, &id, "the server is shutting down".into());
                    return;
                }
                break rx;
            }
            // The queue is full: direct requests are ahead; try again after a batch's wait.
            tokio::time::sleep(poll).await;
        };
        for ((img_id, _), r) in part.into_iter().zip(receivers) {
            match r.await {
                Ok(Ok(caption)) => jobs.update(&id, |j| {
                    j.all.push(Caption {
                        id: img_id,
                        caption,
                    });
                    j.view.done += 1;
                }),
                Ok(Err(e)) => return fail(&jobs, &id, e),
                Err(_) => return fail(&jobs, &id, "the server is shutting down".into()),
            }
        }
    }
    jobs.update(&id, |j| {
        j.view.state = JobState::Done;
        j.ended = Some(Instant::now());
    });
}

fn fail(jobs: &Jobs, id: &str, e: String) {
    jobs.update(id, |j| {
        j.view.state = JobState::Failed;
        j.view.error = Some(e);
        j.ended = Some(Instant::now());
    });
}
