//! Dynamic batching: one thread owns the model and decodes queued images together.
//!
//! Handlers reserve queue slots for all the images of a request at once ([`Queue::reserve`]),
//! so a request is either queued whole or refused whole (503); the batcher takes the first
//! waiting image, then whatever arrives within `max_wait` up to `max_batch` images, and
//! decodes them in groups of equal decoding settings. One thread runs the model because the
//! model's own kernels already use every core: two batches side by side would only share them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::decode::DecodeConfig;
use crate::infer::Predictor;

use super::metrics::Metrics;

/// One image waiting to be captioned.
pub struct Work {
    pub pixels: Vec<f32>,
    pub cfg: DecodeConfig,
    pub seed: u64,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// The bounded queue between the handlers and the batcher.
pub struct Queue {
    tx: Mutex<Option<mpsc::Sender<Work>>>,
    depth: AtomicUsize,
    pub capacity: usize,
}

/// Slots reserved for `n` images; [`Queue::push`] uses them, dropping returns the rest.
pub struct Reservation<'a> {
    queue: &'a Queue,
    left: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.queue.depth.fetch_sub(self.left, Ordering::AcqRel);
    }
}

impl Reservation<'_> {
    /// Queues one image under this reservation; `false` once the server is shutting down.
    pub fn push(&mut self, w: Work) -> bool {
        if self.left == 0 {
            return false;
        }
        let sent = match self
            .queue
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(tx) => tx.send(w).is_ok(),
            None => false,
        };
        if sent {
            // The slot now belongs to the queued image (the batcher frees it).
            self.left -= 1;
        }
        sent
    }
}

impl Queue {
    /// Images waiting (not yet taken into a batch).
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    /// Slots for `n` images at once, or `None` when they do not all fit now.
    pub fn reserve(&self, n: usize) -> Option<Reservation<'_>> {
        let mut cur = self.depth.load(Ordering::Acquire);
        loop {
            if cur + n > self.capacity {
                return None;
            }
            match self.depth.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Reservation {
                        queue: self,
                        left: n,
                    })
                }
                Err(now) => cur = now,
            }
        }
    }

    /// No more work: the batcher finishes what is queued and stops.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub capacity: usize,
}

/// Starts the batcher thread; it returns once the queue is closed and drained.
pub fn start(
    predictor: Arc<Predictor>,
    opts: BatchOptions,
    metrics: Arc<Metrics>,
) -> (Arc<Queue>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Work>();
    let queue = Arc::new(Queue {
        tx: Mutex::new(Some(tx)),
        depth: AtomicUsize::new(0),
        capacity: opts.capacity,
    });
    let q = queue.clone();
    let handle = std::thread::Builder::new()
        .name("ecic-batcher".into())
        .spawn(move || run(&predictor, &rx, opts, &q, &metrics))
        .expect("spawning the batcher thread");
    (queue, handle)
}

fn run(
    predictor: &Predictor,
    rx: &mpsc::Receiver<Work>,
    opts: BatchOptions,
    queue: &Queue,
    metrics: &Metrics,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + opts.max_wait;
        while batch.len() < opts.max_batch.max(1) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(w) => batch.push(w),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        queue.depth.fetch_sub(batch.len(), Ordering::AcqRel);
        metrics.queue_depth.set(queue.depth() as i64);
        metrics.batch_size.observe(batch.len() as f64);
        // Groups of equal settings, in arrival order.
        while !batch.is_empty() {
            let (cfg, seed) = (batch[0].cfg.clone(), batch[0].seed);
            let (group, rest): (Vec<Work>, Vec<Work>) = batch
                .into_iter()
                .partition(|w| w.cfg == cfg && w.seed == seed);
            batch = rest;
            let px: Vec<&[f32]> = group.iter().map(|w| w.pixels.as_slice()).collect();
            // A failure (or a panic inside the model) answers this group's requests with an
            // error; the server goes on.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                predictor.caption(&px, &cfg, seed)
            }));
            let out: Result<Vec<String>, String> = match out {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the model panicked on this batch".into()),
            };
            for (i, w) in group.into_iter().enumerate() {
                let r = match &out {
                    Ok(c) => Ok(c[i].clone()),
                    Err(e) => Err(e.clone()),
                };
                let _ = w.reply.send(r);
            }
        }
    }
}
