//! TELEMETRY=true, as NSM's components read it: the endpoint exports a
//! server span per Request/Close over OTLP/gRPC to
//! NSM_OPEN_TELEMETRY_ENDPOINT (here a local OTLP receiver built from
//! OpenTelemetry's own protos), named after the call, under the service
//! name NSM_NAME, and child of the caller's W3C traceparent, and its metrics
//! every NSM_METRICS_EXPORT_INTERVAL; a collector that does not answer is
//! one warning, and the endpoint keeps serving.

mod nse_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nse_support::*;
use nsm_tests::netns::TestNetns;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

/// One number data point: metric name, attributes, value.
type Point = (String, Vec<(String, String)>, f64);

#[derive(Default, Clone)]
struct MetricsReceiver(Arc<Mutex<Vec<Point>>>);

#[tonic::async_trait]
impl MetricsService for MetricsReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rm in req.into_inner().resource_metrics {
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                let points = match &m.data {
                    Some(Data::Sum(s)) => &s.data_points,
                    Some(Data::Gauge(g)) => &g.data_points,
                    _ => continue,
                };
                for p in points {
                    let value = match p.value {
                        Some(Number::AsInt(i)) => i as f64,
                        Some(Number::AsDouble(d)) => d,
                        None => continue,
                    };
                    let attrs = p
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect();
                    got.push((m.name.clone(), attrs, value));
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                got.push(Received {
                    service: service.clone(),
                    name: span.name.clone(),
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    parent: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A namespace for the endpoint with the receiver listening on its
/// loopback (the endpoint runs there as root; without root, here).
fn receiver_in(ns: Option<&TestNetns>) -> (Receiver, MetricsReceiver, String) {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listener = match ns {
        Some(ns) => forwarder_plugin::netns::Netns::open_path(std::path::Path::new(&ns.path()))
            .unwrap()
            .run(bind)
            .unwrap(),
        None => bind(),
    };
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let receiver = Receiver::default();
    let metrics = MetricsReceiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    let metrics_service = MetricsServiceServer::new(metrics.clone());
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(metrics_service)
            .serve_with_incoming(incoming)
            .await;
    });
    (receiver, metrics, addr)
}

fn traced<T>(msg: T) -> tonic::Request<T> {
    let mut req = Metadata::forwarder().wrap(msg);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01").parse().unwrap(),
    );
    req
}

/// A Request and its Close, each with the caller's traceparent.
async fn request_and_close(nse: &Nse) {
    let mut req = req_p();
    if nse.netns.is_none()
        && let Some(c) = req.connection.as_mut()
    {
        forwarder_plugin::hop::announce_features(c);
    }
    let (mut client, _fds) = nse.dial().await;
    let conn = client
        .request(traced(req))
        .await
        .expect("Request")
        .into_inner();
    let (mut client, _fds) = nse.dial().await;
    client.close(traced(conn)).await.expect("Close");
}

#[tokio::test]
async fn request_and_close_spans_reach_the_collector_as_children_of_the_callers_trace() {
    let ns = is_root().then(|| TestNetns::new("otel"));
    let (receiver, metrics, addr) = receiver_in(ns.as_ref());
    let nse = Nse::start_with(
        &[
            ("TELEMETRY", "true"),
            ("NSM_OPEN_TELEMETRY_ENDPOINT", &addr),
            // The SDK's batch delay (5 s by default), for a quick test.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("NSM_METRICS_EXPORT_INTERVAL", "200ms"),
        ],
        StartOptions {
            netns: ns,
            ..Default::default()
        },
    )
    .await;
    request_and_close(&nse).await;

    let want = [
        "/networkservice.NetworkService/Request",
        "/networkservice.NetworkService/Close",
    ];
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = receiver.0.lock().unwrap().clone();
        if want.iter().all(|w| spans.iter().any(|s| s.name == *w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in want {
        let s = spans
            .iter()
            .find(|s| s.name == w)
            .unwrap_or_else(|| panic!("no span {w}: {spans:?}\n{}", nse.log()));
        assert_eq!(s.service, nse.name, "service.name is NSM_NAME");
        assert_eq!(s.kind, 2, "SPAN_KIND_SERVER");
        assert_eq!(s.trace_id, TRACE_ID, "the caller's trace");
        assert_eq!(s.parent, PARENT_ID, "child of the caller's span");
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(attr("rpc.system"), Some("grpc"), "{s:?}");
        assert_eq!(
            attr("rpc.service"),
            Some("networkservice.NetworkService"),
            "{s:?}"
        );
    }
    assert!(
        !spans.iter().any(|s| s.name.contains("grpc.health")),
        "health checks make no spans: {spans:?}"
    );

    // The metrics, as OpenTelemetry instruments: the calls by method and
    // code, and the connection the function served (none now).
    let has = |points: &[Point], name: &str, attrs: &[(&str, &str)], want: f64| {
        points.iter().rev().any(|(n, a, v)| {
            n == name
                && *v == want
                && attrs
                    .iter()
                    .all(|(k, val)| a.iter().any(|(ak, av)| ak == k && av == val))
        })
    };
    let mut points = Vec::new();
    for _ in 0..100 {
        points = metrics.0.lock().unwrap().clone();
        if has(
            &points,
            "nsm_endpoint_calls",
            &[("method", "Close"), ("code", "Ok")],
            1.0,
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = "nsm_endpoint_calls";
    assert!(
        has(
            &points,
            calls,
            &[("method", "Request"), ("code", "Ok")],
            1.0
        ),
        "{points:?}"
    );
    assert!(
        has(&points, calls, &[("method", "Close"), ("code", "Ok")], 1.0),
        "{points:?}"
    );
    assert!(
        has(
            &points,
            "nsm_endpoint_function_connections",
            &[("function", "mesh-proxy")],
            0.0
        ),
        "{points:?}"
    );
}

#[tokio::test]
async fn a_collector_that_does_not_answer_is_one_warning() {
    let ns = is_root().then(|| TestNetns::new("otel"));
    // The discard port: nothing listens there in the endpoint's namespace.
    let addr = "127.0.0.1:9";
    let nse = Nse::start_with(
        &[
            ("TELEMETRY", "true"),
            ("NSM_OPEN_TELEMETRY_ENDPOINT", addr),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        StartOptions {
            netns: ns,
            ..Default::default()
        },
    )
    .await;
    for _ in 0..5 {
        request_and_close(&nse).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let warned = |log: &str| log.matches("cannot export spans").count();
    let mut n = 0;
    for _ in 0..50 {
        n = warned(&nse.log());
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        n,
        1,
        "one warning for a collector that never answered:\n{}",
        nse.log()
    );
    assert_eq!(
        nse.health("networkservice.NetworkService").await.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}
