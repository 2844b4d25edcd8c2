//! OpenTelemetry as NSM's components have it: off unless `TELEMETRY=true`,
//! then spans, and every `NSM_METRICS_EXPORT_INTERVAL` the metrics
//! ([`crate::metrics`] records each also as an OpenTelemetry instrument),
//! exported over OTLP/gRPC to `NSM_OPEN_TELEMETRY_ENDPOINT`
//! (`host:port`, NSM's default the collector in `observability`) under the
//! service name `NSM_NAME`, and the W3C `traceparent` carried on every call
//! in and out, as NSM's otelgrpc handlers do — so one trace follows a
//! Request from the client through nsmgr and the forwarder to us.
//!
//! An unreachable collector costs nothing but one warning: spans are
//! batched and dropped after a failed export.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, Tracer};

/// NSM's default collector (deployments-k8s' observability namespace).
pub const DEFAULT_ENDPOINT: &str = "otel-collector.observability.svc.cluster.local:4317";
/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest metrics export interval taken.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Whether spans are being exported (set once at start).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// NSM's telemetry settings, each a variable and a flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Export OpenTelemetry spans (OTLP over gRPC) to --open-telemetry-endpoint and carry W3C traceparent on every call.
    #[arg(
        long,
        env = "TELEMETRY",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub telemetry: String,

    /// The OpenTelemetry collector's OTLP/gRPC address, host:port.
    #[arg(long, env = "NSM_OPEN_TELEMETRY_ENDPOINT", value_name = "HOST:PORT", default_value = DEFAULT_ENDPOINT)]
    pub open_telemetry_endpoint: String,

    /// How often metrics are exported to the collector (Go duration).
    #[arg(
        long,
        env = "NSM_METRICS_EXPORT_INTERVAL",
        value_name = "DURATION",
        default_value = "10s"
    )]
    pub metrics_export_interval: String,
}

/// Validated telemetry settings: `None` when off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// `http://host:port`, what the gRPC exporter dials.
    pub endpoint: String,
    pub metrics_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    #[error("TELEMETRY: {0:?} is not true or false")]
    Flag(String),
    #[error("NSM_OPEN_TELEMETRY_ENDPOINT: {0:?} is not host:port")]
    Endpoint(String),
    #[error("NSM_METRICS_EXPORT_INTERVAL: {0}")]
    Interval(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

impl TelemetryArgs {
    pub fn config(&self) -> Result<Option<TelemetryConfig>, TelemetryError> {
        let on = match self.telemetry.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => true,
            "false" | "0" | "" => false,
            _ => return Err(TelemetryError::Flag(self.telemetry.clone())),
        };
        if !on {
            return Ok(None);
        }
        let hp = self.open_telemetry_endpoint.trim();
        let hp = hp
            .strip_prefix("http://")
            .or_else(|| hp.strip_prefix("dns:///"))
            .unwrap_or(hp);
        let valid = hp.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !valid {
            return Err(TelemetryError::Endpoint(
                self.open_telemetry_endpoint.clone(),
            ));
        }
        let metrics_interval = crate::duration::parse(&self.metrics_export_interval)
            .map_err(|e| TelemetryError::Interval(e.to_string()))
            .and_then(|d| {
                if d < MIN_INTERVAL {
                    Err(TelemetryError::Interval(format!(
                        "{:?} is shorter than {MIN_INTERVAL:?}",
                        self.metrics_export_interval
                    )))
                } else {
                    Ok(d)
                }
            })?;
        Ok(Some(TelemetryConfig {
            endpoint: format!("http://{hp}"),
            metrics_interval,
        }))
    }
}

/// The exporting pipeline; dropping it flushes what is batched.
pub struct Telemetry {
    provider: SdkTracerProvider,
    meters: SdkMeterProvider,
}

impl Telemetry {
    /// Starts exporting as `service`; call inside the Tokio runtime (the
    /// gRPC exporter's connection lives there), and end with [`shutdown`].
    pub fn start(config: &TelemetryConfig, service: &str) -> Result<Telemetry, TelemetryError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(WarnOnce::new(exporter, config.endpoint.clone()))
            .with_resource(resource.clone())
            .build();
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let reader = PeriodicReader::builder(metrics)
            .with_interval(config.metrics_interval)
            .build();
        let meters = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_meter_provider(meters.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Telemetry { provider, meters })
    }

    /// What `tracing` spans become OpenTelemetry spans through.
    pub fn tracer(&self) -> Tracer {
        self.provider.tracer("nsm")
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
        let _ = self.meters.shutdown();
    }
}

/// [`Telemetry::start`] inside `runtime` when `config` asks for it.
pub fn start_in(
    runtime: &tokio::runtime::Runtime,
    config: Option<&TelemetryConfig>,
    service: &str,
) -> Result<Option<Telemetry>, TelemetryError> {
    let _in_runtime = runtime.enter();
    config.map(|c| Telemetry::start(c, service)).transpose()
}

/// Flushes what is batched without blocking the runtime the exporter's
/// connection needs (a current-thread runtime would otherwise stall it).
pub async fn shutdown(telemetry: Option<Telemetry>) {
    if let Some(t) = telemetry {
        let _ = tokio::task::spawn_blocking(move || drop(t)).await;
    }
}

/// Whether [`Telemetry::start`] has run: servers make a span per call only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter, warning about the first failed export and the first after
/// a success, not about every batch.
#[derive(Debug)]
struct WarnOnce<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E> WarnOnce<E> {
    fn new(inner: E, endpoint: String) -> Self {
        WarnOnce {
            inner,
            endpoint,
            failing: AtomicBool::new(false),
        }
    }
}

impl<E: SpanExporter> SpanExporter for WarnOnce<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(endpoint = %self.endpoint, error = %e, "cannot export spans to the OpenTelemetry collector; dropping them until it answers");
            }
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!(endpoint = %self.endpoint, "exporting spans again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

struct HeaderReader<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataWriter<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// A server span for one gRPC call (`path`: `/package.Service/Method`),
/// child of the caller's `traceparent` when it sent one.
pub fn server_span(path: &str, headers: &tonic::codegen::http::HeaderMap) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderReader(headers));
    let _ = span.set_parent(parent);
    span
}

/// Writes the current span's context into an outgoing call's metadata
/// (nothing when telemetry is off).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataWriter(metadata));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(on: &str, endpoint: &str) -> TelemetryArgs {
        TelemetryArgs {
            telemetry: on.into(),
            open_telemetry_endpoint: endpoint.into(),
            metrics_export_interval: "10s".into(),
        }
    }

    #[test]
    fn settings_read_as_nsm_writes_them() {
        assert_eq!(args("false", DEFAULT_ENDPOINT).config().unwrap(), None);
        assert_eq!(
            args("true", DEFAULT_ENDPOINT).config().unwrap(),
            Some(TelemetryConfig {
                endpoint: format!("http://{DEFAULT_ENDPOINT}"),
                metrics_interval: Duration::from_secs(10),
            })
        );
        assert_eq!(
            args("TRUE", "http://127.0.0.1:4317").config().unwrap(),
            Some(TelemetryConfig {
                endpoint: "http://127.0.0.1:4317".into(),
                metrics_interval: Duration::from_secs(10),
            })
        );
        for bad in ["collector", "collector:0", ":4317", "a/b:1", "host:port"] {
            assert!(
                matches!(args("true", bad).config(), Err(TelemetryError::Endpoint(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            args("yes", DEFAULT_ENDPOINT).config(),
            Err(TelemetryError::Flag(_))
        ));
        for bad in ["10", "1ms", "-1s"] {
            let mut a = args("true", DEFAULT_ENDPOINT);
            a.metrics_export_interval = bad.into();
            assert!(
                matches!(a.config(), Err(TelemetryError::Interval(_))),
                "{bad}"
            );
        }
    }
}
