//! Prometheus metrics every hop of ours keeps, served as text on
//! `GET /metrics` at `NSM_METRICS_LISTEN_ON` (off by default): Requests and
//! Closes by gRPC code, their latency, the connections established now and
//! registrations with NSM's registry by result, under a prefix per program;
//! a program registers more of its own
//! ([`CallMetrics::register`]).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use opentelemetry::KeyValue;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest request head read from a scraper.
const MAX_HEAD: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

pub struct CallMetrics {
    /// The same, as OpenTelemetry instruments (exported with
    /// `TELEMETRY=true`, no-ops otherwise).
    otel: OtelCalls,
    registry: Mutex<Registry>,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    connections: Gauge,
    registrations: Family<ResultLabels, Counter>,
}

impl CallMetrics {
    /// Metrics named `<prefix>_calls_total`, `<prefix>_call_duration_seconds`,
    /// `<prefix>_connections`.
    pub fn new(prefix: &str) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms … ~4 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 14,
            ))
        });
        let connections = Gauge::default();
        let registrations = Family::<ResultLabels, Counter>::default();
        let mut registry = Registry::with_prefix(prefix);
        registry.register(
            "calls",
            "Requests and Closes answered, by method and gRPC code",
            calls.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "How long Requests and Closes took",
            latency.clone(),
        );
        registry.register(
            "connections",
            "Connections established now",
            connections.clone(),
        );
        registry.register(
            "registrations",
            "Registrations and refreshes with NSM's registry, by result (ok or the gRPC code)",
            registrations.clone(),
        );
        CallMetrics {
            otel: OtelCalls::new(prefix),
            registry: Mutex::new(registry),
            calls,
            latency,
            connections,
            registrations,
        }
    }

    /// Adds a metric of the program's own under the prefix.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, metric);
    }

    /// One answered call: `method` is "Request" or "Close".
    pub fn observe(
        &self,
        method: &'static str,
        code: tonic::Code,
        took: Duration,
        connections: usize,
    ) {
        let code = format!("{code:?}");
        let connections = i64::try_from(connections).unwrap_or(i64::MAX);
        self.otel.observe(method, &code, took, connections);
        self.calls.get_or_create(&CallLabels { method, code }).inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(took.as_secs_f64());
        self.connections.set(connections);
    }

    /// One registration or refresh: `result` is "ok" or the gRPC code / failure.
    pub fn registered(&self, result: &str) {
        self.otel
            .registrations
            .add(1, &[KeyValue::new("result", result.to_owned())]);
        self.registrations
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// [`CallMetrics`] as OpenTelemetry instruments of the global meter
/// provider ([`crate::telemetry`] sets it before any program makes these).
struct OtelCalls {
    calls: opentelemetry::metrics::Counter<u64>,
    latency: opentelemetry::metrics::Histogram<f64>,
    connections: opentelemetry::metrics::Gauge<i64>,
    registrations: opentelemetry::metrics::Counter<u64>,
}

impl OtelCalls {
    fn new(prefix: &str) -> Self {
        let meter = opentelemetry::global::meter("nsm");
        OtelCalls {
            calls: meter
                .u64_counter(format!("{prefix}_calls"))
                .with_description("Requests and Closes answered, by method and gRPC code")
                .build(),
            latency: meter
                .f64_histogram(format!("{prefix}_call_duration_seconds"))
                .with_unit("s")
                .with_description("How long Requests and Closes took")
                .build(),
            connections: meter
                .i64_gauge(format!("{prefix}_connections"))
                .with_description("Connections established now")
                .build(),
            registrations: meter
                .u64_counter(format!("{prefix}_registrations"))
                .with_description("Registrations and refreshes with NSM's registry, by result")
                .build(),
        }
    }

    fn observe(&self, method: &'static str, code: &str, took: Duration, connections: i64) {
        let m = KeyValue::new("method", method);
        self.calls
            .add(1, &[m.clone(), KeyValue::new("code", code.to_owned())]);
        self.latency.record(took.as_secs_f64(), &[m]);
        self.connections.record(connections, &[]);
    }
}

/// Serves `GET /metrics` on `addr` (HTTP/1.x, one response per connection)
/// until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: std::sync::Arc<CallMetrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on GET /metrics");
    loop {
        let (mut sock, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(READ_TIMEOUT, async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let (status, body) = if line.starts_with(b"GET /metrics ") {
                ("200 OK", metrics.encode())
            } else {
                ("404 Not Found", "GET /metrics\n".to_owned())
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
