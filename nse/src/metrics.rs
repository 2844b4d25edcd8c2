//! What the endpoint counts beyond its calls ([`nsm_api::metrics`]): how
//! long its rules take to reach the kernel, by backend, and its connections
//! and failures by network function and by chain — registered beside the
//! calls under `nsm_endpoint_`.

use std::sync::LazyLock;
use std::time::Duration;

use nsm_api::metrics::CallMetrics;
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

/// One write of a table's rules or members to the kernel through `backend`.
pub fn rules_applied(backend: &'static str, took: Duration) {
    RULES_APPLY
        .get_or_create(&BackendLabels { backend })
        .observe(took.as_secs_f64());
}

/// Connections and failures by function and chain.
#[derive(Clone, Default)]
pub struct FunctionMetrics {
    connections: Family<FunctionLabels, Gauge>,
    chains: Family<ChainLabels, Gauge>,
    failures: Family<FunctionLabels, Counter>,
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
        for f in functions {
            self.connections
                .get_or_create(&FunctionLabels {
                    function: f.to_owned(),
                })
                .inc_by(by);
        }
    }

    pub fn failed(&self, function: &str) {
        self.failures
            .get_or_create(&FunctionLabels {
                function: function.to_owned(),
            })
            .inc();
    }
}
