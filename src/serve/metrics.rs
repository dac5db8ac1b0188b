//! `GET /metrics`: the service's counters in the Prometheus exposition format (OpenMetrics
//! text, which Prometheus scrapes), through the `prometheus-client` crate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    pub batch_size: Histogram,
    pub queue_depth: Gauge,
    pub images: Counter,
    pub jobs: Gauge,
}

impl Metrics {
    pub fn new(max_batch: usize) -> Metrics {
        let mut registry = Registry::with_prefix("ecic");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let buckets = (0..)
            .map(|i| (1u64 << i) as f64)
            .take_while(|&b| b < max_batch as f64)
            .chain(std::iter::once(max_batch.max(1) as f64));
        let batch_size = Histogram::new(buckets);
        let queue_depth = Gauge::default();
        let images = Counter::default();
        let jobs = Gauge::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer",
            latency.clone(),
        );
        registry.register(
            "batch_size",
            "Images decoded together per batch",
            batch_size.clone(),
        );
        registry.register(
            "queue_depth",
            "Images waiting for a batch",
            queue_depth.clone(),
        );
        registry.register("images", "Images captioned", images.clone());
        registry.register(
            "jobs",
            "Asynchronous jobs held (running or finished)",
            jobs.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            batch_size,
            queue_depth,
            images,
            jobs,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }

    pub fn observe(&self, endpoint: &'static str, status: u16, secs: f64) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, status })
            .inc();
        self.latency
            .get_or_create(&EndpointLabel { endpoint })
            .observe(secs);
    }
}
