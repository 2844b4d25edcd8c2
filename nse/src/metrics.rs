//! What the endpoint counts beyond its calls ([`nsm_api::metrics`]): how
//! long its rules take to reach the kernel, by backend, and its connections
//! and failures by network function and by chain — registered beside the
//! calls under `nsm_endpoint_`, and recorded as OpenTelemetry instruments
//! too (exported with `TELEMETRY=true`).

use std::sync::LazyLock;
use std::time::Duration;

use nsm_api::metrics::CallMetrics;
use opentelemetry::KeyValue;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChainLabels {
    chain: String,
}

/// Rule writes of every table in the process (tables start before the
/// endpoint that serves the metrics exists).
static RULES_APPLY: LazyLock<Family<BackendLabels, Histogram>> = LazyLock::new(|| {
    // 50 µs … ~0.8 s.
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.00005, 2.0, 15)))
});

static OTEL_RULES_APPLY: LazyLock<opentelemetry::metrics::Histogram<f64>> = LazyLock::new(|| {
    opentelemetry::global::meter("nsm")
        .f64_histogram("nsm_endpoint_rules_apply_duration_seconds")
        .with_unit("s")
        .with_description("How long writing the endpoint's rules to the kernel took, by backend")
        .build()
});

/// Starts of the proxies the endpoint runs (`proxy.process`), restarts apart.
static PROXY_STARTS: LazyLock<Family<RestartLabels, Counter>> = LazyLock::new(Family::default);

/// Upgrades of that proxy to a changed definition, by outcome.
static PROXY_UPGRADES: LazyLock<Family<OutcomeLabels, Counter>> = LazyLock::new(Family::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    restart: &'static str,
}

/// The endpoint started its proxy (`restart`: again, after it failed).
pub fn proxy_started(restart: bool) {
    PROXY_STARTS
        .get_or_create(&RestartLabels {
            restart: if restart { "true" } else { "false" },
        })
        .inc();
}

/// An upgrade of the endpoint's proxy: `done` (the new one serves) or
/// `failed` (the old one stays).
pub fn proxy_upgraded(done: bool) {
    PROXY_UPGRADES
        .get_or_create(&OutcomeLabels {
            outcome: if done { "done" } else { "failed" },
        })
        .inc();
}

/// One write of a table's rules or members to the kernel through `backend`.
pub fn rules_applied(backend: &'static str, took: Duration) {
    RULES_APPLY
        .get_or_create(&BackendLabels { backend })
        .observe(took.as_secs_f64());
    OTEL_RULES_APPLY.record(took.as_secs_f64(), &[KeyValue::new("backend", backend)]);
}

/// Connections and failures by function and chain.
#[derive(Clone)]
pub struct FunctionMetrics {
    connections: Family<FunctionLabels, Gauge>,
    chains: Family<ChainLabels, Gauge>,
    failures: Family<FunctionLabels, Counter>,
    otel_connections: opentelemetry::metrics::UpDownCounter<i64>,
    otel_chains: opentelemetry::metrics::UpDownCounter<i64>,
    otel_failures: opentelemetry::metrics::Counter<u64>,
}

impl Default for FunctionMetrics {
    fn default() -> Self {
        let meter = opentelemetry::global::meter("nsm");
        FunctionMetrics {
            connections: Family::default(),
            chains: Family::default(),
            failures: Family::default(),
            otel_connections: meter
                .i64_up_down_counter("nsm_endpoint_function_connections")
                .build(),
            otel_chains: meter
                .i64_up_down_counter("nsm_endpoint_chain_connections")
                .build(),
            otel_failures: meter.u64_counter("nsm_endpoint_function_failures").build(),
        }
    }
}

impl FunctionMetrics {
    /// The endpoint's function metrics, and the process's rule timings,
    /// registered in `calls`.
    pub fn register(calls: &CallMetrics) -> FunctionMetrics {
        let m = FunctionMetrics::default();
        calls.register(
            "rules_apply_duration_seconds",
            "How long writing the endpoint's rules (or their interface set) to the kernel took, by backend",
            RULES_APPLY.clone(),
        );
        calls.register(
            "proxy_starts",
            "Starts of the proxy the endpoint runs (proxy.process); restart=\"true\": after it failed",
            PROXY_STARTS.clone(),
        );
        calls.register(
            "proxy_upgrades",
            "Upgrades of the endpoint's proxy to a changed definition; outcome=\"failed\": the running one stayed",
            PROXY_UPGRADES.clone(),
        );
        calls.register(
            "function_connections",
            "Connections each network function instance serves now",
            m.connections.clone(),
        );
        calls.register(
            "chain_connections",
            "Connections on each chain now",
            m.chains.clone(),
        );
        calls.register(
            "function_failures",
            "Requests a network function instance failed (the whole chain was rolled back)",
            m.failures.clone(),
        );
        m
    }

    /// A connection joined (`by` 1) or left (`by` -1) `chain` and its functions.
    pub fn moved<'a>(&self, chain: &str, functions: impl IntoIterator<Item = &'a str>, by: i64) {
        self.chains
            .get_or_create(&ChainLabels {
                chain: chain.to_owned(),
            })
            .inc_by(by);
        self.otel_chains
            .add(by, &[KeyValue::new("chain", chain.to_owned())]);
        for f in functions {
            self.connections
                .get_or_create(&FunctionLabels {
                    function: f.to_owned(),
                })
                .inc_by(by);
            self.otel_connections
                .add(by, &[KeyValue::new("function", f.to_owned())]);
        }
    }

    pub fn failed(&self, function: &str) {
        self.failures
            .get_or_create(&FunctionLabels {
                function: function.to_owned(),
            })
            .inc();
        self.otel_failures
            .add(1, &[KeyValue::new("function", function.to_owned())]);
    }
}
