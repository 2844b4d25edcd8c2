//! What makes this hop a forwarder: Request the next hop, plumb the two
//! namespaces from its answer, answer the client with its own mechanism;
//! Close undoes and closes downstream. Runs behind the NSM hop chain
//! (updatepath, begin, updatetoken, timeout), so it sees the connection at
//! our own path segment, one event per connection at a time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nsm_api::connection::{Connection, Mechanism};
use nsm_api::grpcfd::FdChannel;
use nsm_api::mechanism::MechanismExt;
use nsm_api::metrics::CallMetrics;
use nsm_api::monitor::MonitorHub;
use nsm_api::path::{ConnectionExt, from_timestamp, to_timestamp};
use nsm_api::token::TokenIssuer;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prost::Message;
use tokio::time::Instant;

use super::client_side::{client_mechanism, client_netns};
use super::downstream::{Accepted, CallToken, NextHop};
use super::error::ForwardError;
use super::route::{Routed, Router};
use super::watch::Watches;
use crate::hop::{Hop, HopRecord, PlumbRequest, Session};
use crate::link::{LinkError, Links};
use crate::netns::Netns;

/// The client's side of a Request: its namespace, a netlink handle being
/// opened there, and its mechanism.
struct Client<'a> {
    netns: Netns,
    links: Option<tokio::task::JoinHandle<Result<Links, LinkError>>>,
    mechanism: &'a Mechanism,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

pub struct Forwarder {
    hop: Arc<Hop>,
    router: Router,
    /// Each connection's endpoint, watched for its death (NSM heal).
    watches: Watches,
    metrics: Arc<CallMetrics>,
    /// How long plumbing took (veth, addresses, routes, rules), by backend.
    plumb_seconds: Family<BackendLabel, Histogram>,
    issuer: Arc<TokenIssuer>,
    dial_timeout: Duration,
    /// Bound on a Close downstream.
    close_timeout: Duration,
}

impl Forwarder {
    pub fn new(
        hop: Arc<Hop>,
        router: Router,
        monitor: MonitorHub,
        issuer: Arc<TokenIssuer>,
        dial_timeout: Duration,
        close_timeout: Duration,
    ) -> Forwarder {
        let metrics = Arc::new(CallMetrics::new("nsm_forwarder"));
        let plumb_seconds = Family::<BackendLabel, Histogram>::new_with_constructor(|| {
            // 0.25 ms … ~2 s.
            Histogram::new(exponential_buckets(0.00025, 2.0, 14))
        });
        metrics.register(
            "plumb_duration_seconds",
            "How long a Request's plumbing took here (veth, addresses, routes, rules), by rules backend",
            plumb_seconds.clone(),
        );
        if let Some(events) = hop.proxy_events() {
            metrics.register(
                "client_proxy_events",
                "Proxies started in clients' namespaces: start, restart (after it died), upgrade (a new definition took over), failure (not ready)",
                events,
            );
        }
        Forwarder {
            hop,
            router,
            watches: Watches::new(monitor),
            metrics,
            plumb_seconds,
            issuer,
            dial_timeout,
            close_timeout,
        }
    }

    /// What the forwarder counts (served by [`nsm_api::metrics::serve`]).
    pub fn metrics(&self) -> &Arc<CallMetrics> {
        &self.metrics
    }

    pub fn hop(&self) -> &Arc<Hop> {
        &self.hop
    }

    /// `conn` is at our own path segment, which carries our fresh token.
    pub async fn request(
        &self,
        fds: Option<&FdChannel>,
        conn: Connection,
        preferences: &[Mechanism],
        deadline: Instant,
    ) -> Result<Connection, ForwardError> {
        let id = conn.id.clone();
        let client_mech = client_mechanism(&conn, preferences)?;
        let client = client_netns(fds, &client_mech).await?;
        if client.id() == self.hop.own_netns() {
            // Refused before anything goes downstream (Hop::plumb checks too).
            return Err(crate::hop::HopError::OwnNetns {
                end: "client",
                netns: client.id().to_string(),
            }
            .into());
        }
        let known = self.hop.record(&id);
        let expires = prev_expires(&conn);
        let caller_id = conn.prev_segment().map(|s| s.id.clone());
        // A netlink socket in the client's namespace takes a thread that
        // enters it: open it while the next hop decides.
        let client_links = client
            .try_clone()
            .ok()
            .map(|ns| tokio::task::spawn_blocking(move || Links::open(&ns)));
        let mut down = conn;
        crate::hop::announce(&mut down, &self.hop.proxy_names());
        // A refresh presents the endpoint's mechanism as it returned it
        // (NSM's mechanismtranslation); a first Request presents none.
        down.mechanism = known
            .as_ref()
            .and_then(decode_downstream)
            .and_then(|c| c.mechanism);
        let asked = std::time::Instant::now();
        let routed = self.router.route(&mut down, deadline).await?;
        let next_hop = &routed.hop;
        let ours = down
            .path
            .as_ref()
            .and_then(|p| p.path_segments.get(p.index as usize))
            .cloned();
        let accepted = next_hop.request(down, deadline).await?;
        let downstream = asked.elapsed();
        match self
            .plumb(
                &id,
                Client {
                    netns: client,
                    links: client_links,
                    mechanism: &client_mech,
                },
                (next_hop, &accepted),
                expires,
                caller_id,
                downstream,
            )
            .await
        {
            Ok(conn) => {
                if let Some(ours) = ours {
                    self.watches.start(conn.id.clone(), routed, ours);
                }
                Ok(conn)
            }
            Err(e) => {
                // A refresh that fails keeps the established connection (NSM's
                // begin); a new one the endpoint accepted must not linger there.
                if known.is_none() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let timeout = left.max(self.dial_timeout);
                    if let Err(ce) = next_hop.close(accepted.conn.clone(), timeout).await {
                        tracing::warn!(%id, error = %ce, "cannot Close the refused connection downstream");
                    }
                }
                Err(e)
            }
        }
    }

    async fn plumb(
        &self,
        id: &str,
        client: Client<'_>,
        // The endpoint's answer and the hop it came from (its fds are there).
        (next_hop, accepted): (&NextHop, &Accepted),
        expires: Option<SystemTime>,
        caller_id: Option<String>,
        downstream: Duration,
    ) -> Result<Connection, ForwardError> {
        let started = std::time::Instant::now();
        let (endpoint_mech, endpoint) = next_hop.endpoint_netns(accepted).await?;
        let client_mech = client.mechanism;
        let client_if = client_mech.interface_name().unwrap_or_default();
        // If that failed, the hop opens one itself (and says why it cannot).
        let client_links = match client.links {
            Some(task) => task.await.ok().and_then(Result::ok),
            None => None,
        };
        let endpoint_if = endpoint_mech.interface_name().unwrap_or_default();
        let session = Session {
            next_hop: Some(self.router.configured().url().to_owned()),
            downstream: Some(hex(&accepted.conn.encode_to_vec())),
            expires_unix: expires
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            caller_id,
            closing: false,
        };
        let done = self
            .hop
            .plumb(PlumbRequest {
                id,
                client: client.netns,
                endpoint,
                client_links,
                client_if,
                endpoint_if,
                connection: &accepted.conn,
                session,
            })
            .await?;
        self.plumb_seconds
            .get_or_create(&BackendLabel {
                backend: done.record.backend.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            %id,
            client_if,
            endpoint_if,
            client_index = done.applied.client_index,
            endpoint_index = done.applied.endpoint_index,
            refreshed = done.refreshed,
            changed = done.applied.changed,
            rules = done.record.rules.is_some(),
            // Where a slow setup spent its time: the next hop, or here.
            ?downstream,
            plumbing = ?started.elapsed(),
            "plumbed"
        );
        // The client gets its own mechanism back (NSM forwarders return the
        // upstream mechanism), with everything else as the endpoint answered.
        let mut out = accepted.conn.clone();
        out.mechanism = Some(client_mech.clone());
        Ok(out)
    }

    /// Undoes connection `id` and closes it downstream with the connection
    /// the next hop last returned (or, if nothing is recorded, `fallback`:
    /// an NSM hop closes by id and path, whatever the mechanism says);
    /// `token` goes in our segment and the metadata. The local undo runs
    /// first and its error wins; the Close downstream is attempted either way.
    pub async fn close(
        &self,
        id: &str,
        token: &CallToken,
        fallback: Option<Connection>,
    ) -> Result<(), ForwardError> {
        self.watches.stop(id);
        let record = self.hop.record(id);
        let undone = match &record {
            Some(_) => self.hop.unplumb(id).await.map(|_| ()),
            None => Ok(()),
        };
        match &undone {
            Ok(()) if record.is_some() => tracing::info!(%id, "unplumbed"),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(%id, error = %e, "cannot unplumb; the state directory keeps the connection, and the next start tries again");
                if let Err(me) = self.hop.mark_closing(id).await {
                    tracing::error!(%id, error = %me, "cannot record that the connection is to be undone");
                }
            }
        }
        let down = record.as_ref().and_then(decode_downstream).or_else(|| {
            fallback.map(|mut c| {
                c.mechanism = None;
                c
            })
        });
        if let Some(mut down) = down {
            set_own_token(&mut down, token);
            let deadline = Instant::now() + self.close_timeout;
            // `Routed` holds the endpoint's socket fd until the Close is sent.
            let next = match record.as_ref().and_then(|r| self.recorded_next_hop(r)) {
                Some(hop) => Ok(Routed::to(hop)),
                None => self.router.route_close(&down, deadline).await,
            };
            match next {
                Ok(next) => {
                    if let Err(e) = next.hop.close(down, self.close_timeout).await {
                        tracing::warn!(%id, error = %e, "Close downstream failed; the endpoint expires the connection itself");
                    }
                }
                Err(e) => {
                    tracing::warn!(%id, error = %e, "no next hop to Close; the endpoint expires the connection itself");
                }
            }
        }
        undone.map_err(ForwardError::from)
    }

    /// [`Forwarder::close`] with a token of our own (no caller: expiry of
    /// an adopted connection, `--cleanup-on-exit`, a Close after a restart).
    pub async fn close_own(&self, id: &str) -> Result<(), ForwardError> {
        let token = self
            .issuer
            .issue()
            .map_err(|e| ForwardError::Internal(format!("cannot issue a token: {e}")))?;
        let token = CallToken {
            jwt: token.jwt,
            expires: token.expires,
        };
        self.close(id, &token, None).await
    }

    /// The next hop a connection was recorded with, when it is not the
    /// configured one (`None`: route as for a new Request).
    fn recorded_next_hop(&self, record: &HopRecord) -> Option<NextHop> {
        let configured = self.router.configured();
        let path = record
            .session
            .next_hop
            .as_deref()
            .and_then(|u| u.strip_prefix("unix://"))?;
        if path == configured.url().trim_start_matches("unix://") {
            return None;
        }
        match configured.at(&PathBuf::from(path)) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(%path, error = %e, "cannot make a client for the recorded next hop; using the configured one");
                None
            }
        }
    }
}

/// Our segment's token (set by updatetoken) for the call downstream.
pub fn own_token(conn: &Connection) -> Result<CallToken, ForwardError> {
    let seg = conn
        .current_segment()
        .ok_or_else(|| ForwardError::Internal("no own path segment after updatepath".into()))?;
    let expires = seg
        .expires
        .as_ref()
        .and_then(from_timestamp)
        .ok_or_else(|| {
            ForwardError::Internal("own path segment has no expires after updatetoken".into())
        })?;
    Ok(CallToken {
        jwt: seg.token.clone(),
        expires,
    })
}

fn set_own_token(conn: &mut Connection, token: &CallToken) {
    let index = conn.index();
    if let Some(seg) = conn
        .path
        .as_mut()
        .and_then(|p| p.path_segments.get_mut(index))
    {
        seg.token = token.jwt.clone();
        seg.expires = Some(to_timestamp(token.expires));
    }
}

/// The previous hop's token expiry: when an unrefreshed connection expires
/// (at most `timeout::MAX_LIFETIME` from now, as the timeout element caps it).
fn prev_expires(conn: &Connection) -> Option<SystemTime> {
    conn.prev_segment()
        .and_then(|s| s.expires.as_ref())
        .and_then(from_timestamp)
        .map(|t| t.min(SystemTime::now() + nsm_api::chain::timeout::MAX_LIFETIME))
}

/// The connection the next hop last returned, from the record.
pub fn decode_downstream(record: &HopRecord) -> Option<Connection> {
    let bytes = unhex(record.session.downstream.as_deref()?)?;
    Connection::decode(bytes.as_slice()).ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&data)).unwrap(), data);
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
