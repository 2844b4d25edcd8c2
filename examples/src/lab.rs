//! The demo's topology, shared by `local-demo`, the end-to-end suite and the
//! setup benchmark:
//!
//! ```text
//!  client ns(s)          root ns                 nse ns                         server ns
//!  ───────────           ───────                 ──────                         ─────────
//!  nsc-init ──Request──▶ forwarder-plugin ──▶ mesh-proxy-nse                    hello-server
//!                        serve (fds only)        proxy (uid 1337) :15001/:15006  :8080
//!  nsm-1 ◀────── veth built by the forwarder ──▶ (NSE side)
//!                                                to-server 198.19.100.1/24 ─veth─ to-nse 198.19.100.2/24
//!                                                          fd00:100::1/64        fd00:100::2/64
//!                                                                                routes back via .1
//!  eth0 ─veth─ node ns (a pod's own network, [`Lab::attach_pod_network`])
//!              bridge `pods` 198.19.200.1/24, fd00:200::1/64 (the node's address, kubelet's probes)
//!              cluster DNS 198.19.53.53, fd00:53::53 (UDP 53, answers A queries with 198.19.54.1)
//!              a cluster service 198.19.54.1:8080 (hello-server)
//! ```
//!
//! Clients get their addresses from `NSM_CIDR_PREFIX` (198.18.0.0/24 by
//! default). The nse namespace forwards IPv4 and the server routes the
//! client range back through it, so a connection that bypassed the proxy
//! would still arrive — with the client's address — and a test can tell the
//! two apart by the address the server saw, not just by a timeout.
//!
//! Nothing here touches the root namespace's links, routes or firewall: the
//! forwarder runs there but only acts through the namespaces' fds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nsm_api::tls::Identity;

use crate::namespace::{Namespace, NamespaceError};
use crate::nsc::NscOptions;
use crate::process::{self, Process, ProcessError, WorkDir};
use crate::proxy::{self, ProxyKind, ProxyStartError};
use crate::svid::{SvidError, TestCa};
use crate::transparent_proxy::{find_in_log, parse_log_line};

/// The NSE's end of the link to the server.
pub const NSE_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 19, 100, 1);
/// The server's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 100, 2);
/// The NSE's end of the link to the server, and the server, in IPv6.
pub const NSE_UPLINK6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
/// Where IPv6 client addresses come from, for a dual-stack `NSM_CIDR_PREFIX`
/// (`[198.18.0.0/24], [fd00:18::/120]`); the server routes it back.
pub const CLIENT_CIDR6: &str = "fd00:18::/120";

/// The pod network ([`Lab::attach_pod_network`]): the node's address on
/// the pods' bridge (where kubelet's probes come from) and each pod's
/// default gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// The cluster DNS service address (UDP 53, in the node namespace).
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(198, 19, 53, 53);
pub const CLUSTER_DNS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x53, 0, 0, 0, 0, 0, 0x53);
/// What the cluster DNS answers to every A query.
pub const CLUSTER_DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(198, 19, 54, 1);
/// A cluster service (hello-server :8080 in the node namespace) and the
/// service CIDR it is in.
pub const CLUSTER_SERVICE: Ipv4Addr = Ipv4Addr::new(198, 19, 54, 1);
pub const CLUSTER_SERVICE_NET: &str = "198.19.54.0/24";
/// A second port of the cluster service, in Linux's ephemeral range.
pub const CLUSTER_HIGH_PORT: u16 = 40000;
/// The pods' bridge in the node namespace.
const POD_BRIDGE: &str = "pods";
/// Most pods one lab attaches.
const MAX_PODS: u32 = 200;
pub const SERVER_PORT: u16 = 8080;
/// A second port of the server (the chain examples deny it).
pub const SERVER_PORT_2: u16 = 8081;
/// The server's subnet (what clients need a route to).
pub const SERVER_NET: &str = "198.19.100.0/24";
/// Where client addresses come from (`NSM_CIDR_PREFIX`).
pub const CLIENT_CIDR: &str = "198.18.0.0/24";
/// Everything on the client side (NSM clients in 198.18.0.0/16, the static
/// client in 198.19.1.0/24), routed back by the server.
const CLIENT_SIDE: [&str; 2] = ["198.18.0.0/16", "198.19.1.0/24"];
/// Interface names inside the nse and server namespaces.
pub const NSE_TO_SERVER: &str = "to-server";
pub const SERVER_TO_NSE: &str = "to-nse";

/// The static client of [`Lab::attach_static_client`] and its link's name
/// on the nse side.
pub const STATIC_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
pub const STATIC_CLIENT_LINK: &str = "to-client";

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The lab's trust domain and the SPIFFE IDs of its hops (NSM's k8s
/// template: `spiffe://k8s.nsm/ns/<namespace>/pod/<pod>`).
pub const TRUST_DOMAIN: &str = "k8s.nsm";
pub const NSE_SPIFFE_PATH: &str = "/ns/mesh-proxy/pod/mesh-proxy-nse";
pub const FORWARDER_SPIFFE_PATH: &str = "/ns/nsm-system/pod/forwarder-plugin";

pub fn server_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVER_IP), SERVER_PORT)
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Proxy(#[from] ProxyStartError),
    #[error(
        "{0} is not built: run `cargo build --workspace --bins` (tests/run.sh and examples/local-demo.sh do)"
    )]
    NotBuilt(String),
    #[error("the lab has attached {MAX_PODS} pod networks already")]
    TooManyPods,
    #[error("the lab's SPIFFE CA: {0}")]
    Svid(#[from] SvidError),
}

/// A pod's own network ([`Lab::attach_pod_network`]): `eth0` with these
/// addresses and default routes via the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodNetwork {
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub proxy: ProxyKind,
    /// `NSM_CIDR_PREFIX` of the NSE.
    pub cidr_prefix: String,
    /// `NSM_MAX_TOKEN_LIFETIME` of the NSE and the forwarder, if set.
    pub token_lifetime: Option<String>,
    /// `NSM_LOG_LEVEL` of the NSE and the forwarder.
    pub log_level: String,
    /// More variables for the NSE (e.g. `NSM_CONFIG`).
    pub nse_env: Vec<(String, String)>,
    /// More arguments for `forwarder-plugin serve`.
    pub forwarder_args: Vec<String>,
    /// Progress lines (the demo prints them; tests and benches stay quiet).
    pub say: fn(&str),
    /// mTLS with SPIFFE SVIDs on every hop (the default): the lab is its own
    /// CA ([`crate::svid::TestCa`]) and hands each process SVID files, as
    /// SPIRE would. `false`: `NSM_INSECURE=true` everywhere.
    pub secure: bool,
    /// NSM's manager (`unix://…` of an nsmgr): when set, the NSE and the
    /// forwarder register with it (`NSM_CONNECT_TO`) and the forwarder sends
    /// Requests on to it, as in an NSM cluster; unset, the forwarder's next
    /// hop is the NSE itself.
    pub manager: Option<String>,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            proxy: ProxyKind::auto(),
            cidr_prefix: CLIENT_CIDR.to_owned(),
            token_lifetime: None,
            log_level: "INFO".to_owned(),
            nse_env: Vec::new(),
            forwarder_args: Vec::new(),
            say: |_| {},
            secure: true,
            manager: None,
        }
    }
}

/// The running topology. Fields drop in order: control plane first, then
/// the proxy and server, then the namespaces, then the scratch directory.
#[derive(Debug)]
pub struct Lab {
    forwarder: Option<Process>,
    nse: Option<Process>,
    pub proxy: Process,
    pub server: Process,
    /// The node's DNS and cluster service.
    pub node: Process,
    pub nse_ns: Namespace,
    pub server_ns: Namespace,
    pub node_ns: Namespace,
    pods: AtomicU32,
    /// The lab's SPIFFE CA (secure labs).
    ca: Option<TestCa>,
    pub dir: WorkDir,
    pub config: LabConfig,
}

fn require_bin(name: &str) -> Result<std::path::PathBuf, LabError> {
    let p = process::bin(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(LabError::NotBuilt(p.display().to_string()))
    }
}

impl Lab {
    /// The data path only: nse and server namespaces, their veth, the server
    /// and the proxy. No NSE, no forwarder (see [`Lab::start`]).
    pub fn data_path(config: LabConfig) -> Result<Lab, LabError> {
        let say = config.say;
        require_bin("hello-server")?;
        if config.proxy == ProxyKind::Builtin {
            require_bin("transparent-proxy")?;
        }
        // What killed runs (SIGKILL, abort) could not clean up.
        for name in crate::namespace::sweep_stale() {
            say(&format!("removed namespace {name} left by a killed run"));
        }
        WorkDir::sweep_stale();
        let dir = WorkDir::create()?;
        let nse_ns = Namespace::create("mp-nse")?;
        let server_ns = Namespace::create("mp-server")?;
        say(&format!(
            "namespaces: {} (endpoint + proxy), {} (server)",
            nse_ns.name(),
            server_ns.name()
        ));
        let (nse, server) = (&nse_ns, &server_ns);
        nse.ip(&format!(
            "link add {NSE_TO_SERVER} type veth peer name {SERVER_TO_NSE} netns {}",
            server.name()
        ))?;
        // No IPv6 link-local addresses on our own links: the kernel adds them
        // whenever it gets to it, which would make snapshots racy.
        nse.ip(&format!("link set {NSE_TO_SERVER} addrgenmode none"))?;
        server.ip(&format!("link set {SERVER_TO_NSE} addrgenmode none"))?;
        nse.ip(&format!("addr add {NSE_UPLINK}/24 dev {NSE_TO_SERVER}"))?;
        nse.ip(&format!("link set {NSE_TO_SERVER} up"))?;
        server.ip(&format!("addr add {SERVER_IP}/24 dev {SERVER_TO_NSE}"))?;
        server.ip(&format!("link set {SERVER_TO_NSE} up"))?;
        for net in CLIENT_SIDE {
            server.ip(&format!("route add {net} via {NSE_UPLINK}"))?;
        }
        nse.ip(&format!(
            "-6 addr add {NSE_UPLINK6}/64 dev {NSE_TO_SERVER} nodad"
        ))?;
        server.ip(&format!(
            "-6 addr add {SERVER_IP6}/64 dev {SERVER_TO_NSE} nodad"
        ))?;
        server.ip(&format!("-6 route add {CLIENT_CIDR6} via {NSE_UPLINK6}"))?;
        nse_ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        nse_ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        say(&format!(
            "veth {NSE_TO_SERVER} {NSE_UPLINK}/24 ⇄ {SERVER_TO_NSE} {SERVER_IP}/24; server routes {} back via {NSE_UPLINK}",
            CLIENT_SIDE.join(" and ")
        ));

        let mut cmd = server_ns.command(process::bin("hello-server"));
        cmd.args(["--listen", &format!("0.0.0.0:{SERVER_PORT}")])
            .args(["--listen", &format!("0.0.0.0:{SERVER_PORT_2}")])
            .args(["--listen", &format!("[{SERVER_IP6}]:{SERVER_PORT}")]);
        let mut server = Process::spawn("hello-server", &mut cmd, &dir.join("server.log"))?;
        proxy::wait_listening(&mut server, SERVER_PORT, READY_TIMEOUT)?;

        let node_ns = Namespace::create("mp-node")?;
        let node = &node_ns;
        for cmd in [
            format!("link add {POD_BRIDGE} type bridge"),
            format!("link set {POD_BRIDGE} addrgenmode none"),
            format!("addr add {NODE_IP}/24 dev {POD_BRIDGE}"),
            format!("-6 addr add {NODE_IP6}/64 dev {POD_BRIDGE} nodad"),
            format!("link set {POD_BRIDGE} up"),
            format!("addr add {CLUSTER_DNS}/32 dev lo"),
            format!("-6 addr add {CLUSTER_DNS6}/128 dev lo"),
            format!("addr add {CLUSTER_SERVICE}/32 dev lo"),
        ] {
            node.ip(&cmd)?;
        }
        let mut cmd = node_ns.command(process::bin("hello-server"));
        cmd.args(["--listen", &format!("{CLUSTER_SERVICE}:{SERVER_PORT}")])
            .args([
                "--listen",
                &format!("{CLUSTER_SERVICE}:{CLUSTER_HIGH_PORT}"),
            ])
            .args(["--dns", &format!("{CLUSTER_DNS}:53")])
            .args(["--dns", &format!("[{CLUSTER_DNS6}]:53")])
            .args(["--dns-answer", &CLUSTER_DNS_ANSWER.to_string()]);
        let mut node_proc = Process::spawn("node services", &mut cmd, &dir.join("node.log"))?;
        proxy::wait_listening(&mut node_proc, SERVER_PORT, READY_TIMEOUT)?;
        say(&format!(
            "{} (a node): pods' bridge {NODE_IP}/24, cluster DNS {CLUSTER_DNS}:53, a cluster service {CLUSTER_SERVICE}:{SERVER_PORT}",
            node_ns.name()
        ));
        say(&format!(
            "hello-server listening on {} in {}",
            server_addr(),
            server_ns.name()
        ));

        let proxy = proxy::start(config.proxy, &nse_ns, &dir, "proxy")?;
        let ca = if config.secure {
            say(&format!(
                "SPIFFE: a CA for trust domain {TRUST_DOMAIN} issues each hop an X.509-SVID (mTLS, signed tokens)"
            ));
            Some(TestCa::new(TRUST_DOMAIN)?)
        } else {
            say("NSM_INSECURE=true: no TLS");
            None
        };
        say(&format!(
            "proxy ({}) listening on :15001 and :15006 in {} as uid 1337",
            config.proxy.name(),
            nse_ns.name()
        ));
        Ok(Lab {
            forwarder: None,
            nse: None,
            proxy,
            server,
            node: node_proc,
            nse_ns,
            server_ns,
            node_ns,
            pods: AtomicU32::new(0),
            ca,
            dir,
            config,
        })
    }

    /// The whole topology: [`Lab::data_path`], then `mesh-proxy-nse` in the
    /// nse namespace and `forwarder-plugin serve` in the root namespace.
    pub fn start(config: LabConfig) -> Result<Lab, LabError> {
        require_bin("mesh-proxy-nse")?;
        require_bin("forwarder-plugin")?;
        require_bin("nsc-init")?;
        let mut lab = Lab::data_path(config)?;
        lab.start_nse()?;
        lab.start_forwarder()?;
        Ok(lab)
    }

    pub fn nse_socket(&self) -> std::path::PathBuf {
        self.dir.join("nse.sock")
    }

    pub fn forwarder_socket(&self) -> std::path::PathBuf {
        self.dir.join("forwarder.sock")
    }

    /// `unix://…` of the forwarder: what clients connect to.
    pub fn forwarder_url(&self) -> String {
        format!("unix://{}", self.forwarder_socket().display())
    }

    pub fn nse_url(&self) -> String {
        format!("unix://{}", self.nse_socket().display())
    }

    /// The identity variables of a process of this lab: SVID files for
    /// `spiffe://k8s.nsm/<path>` (written under `spiffe/<who>/`), or
    /// `NSM_INSECURE=true`.
    pub fn identity_env(&self, who: &str, path: &str) -> Result<Vec<(String, String)>, LabError> {
        let Some(ca) = &self.ca else {
            return Ok(vec![("NSM_INSECURE".into(), "true".into())]);
        };
        let dir = self.dir.join("spiffe").join(who);
        std::fs::create_dir_all(&dir).map_err(|source| SvidError::Write {
            path: dir.clone(),
            source,
        })?;
        let files = ca.write(&ca.issue(path)?, &dir)?;
        Ok(vec![
            (
                "NSM_SVID_CERT_FILE".into(),
                files.cert.display().to_string(),
            ),
            ("NSM_SVID_KEY_FILE".into(), files.key.display().to_string()),
            (
                "NSM_TRUST_BUNDLE_FILE".into(),
                files.bundle.display().to_string(),
            ),
        ])
    }

    /// An in-process identity of this lab's trust domain for
    /// `spiffe://k8s.nsm/<path>` (`None` in an insecure lab).
    pub fn identity(&self, path: &str) -> Result<Option<Arc<Identity>>, LabError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        Ok(Some(Identity::new(ca.material(&ca.issue(path)?)?)))
    }

    /// An in-process NSM client of the lab's forwarder named `name`, with the
    /// SVID `spiffe://k8s.nsm/ns/default/pod/<name>` in a secure lab and
    /// tokens that live 10 minutes.
    pub fn direct_client(&self, name: &str) -> crate::direct_client::DirectClient {
        let identity = self
            .identity(&format!("/ns/default/pod/{name}"))
            .unwrap_or_else(|e| panic!("the lab's CA: {e}"));
        crate::direct_client::DirectClient::new(
            &self.forwarder_socket(),
            name,
            Duration::from_secs(600),
            identity.as_ref(),
        )
        .unwrap_or_else(|e| panic!("a direct client: {e}"))
    }

    fn control_env(&self, cmd: &mut Command, who: &str, path: &str) -> Result<(), LabError> {
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.identity_env(who, path)?)
            .env("NSM_LOG_LEVEL", &self.config.log_level);
        if let Some(l) = &self.config.token_lifetime {
            cmd.env("NSM_MAX_TOKEN_LIFETIME", l);
        }
        Ok(())
    }

    /// Starts `mesh-proxy-nse` in the nse namespace; returns once its socket exists.
    pub fn start_nse(&mut self) -> Result<(), LabError> {
        let mut cmd = self.nse_ns.command(process::bin("mesh-proxy-nse"));
        self.control_env(&mut cmd, "nse", NSE_SPIFFE_PATH)?;
        cmd.env("NSM_NAME", "mesh-proxy-nse")
            .env("NSM_LISTEN_ON", self.nse_url())
            .env("NSM_SERVICE_NAMES", "mesh-proxy")
            .env("NSM_CIDR_PREFIX", &self.config.cidr_prefix)
            // A restart adopts what the previous run left (fail closed).
            .env("NSM_STATE_DIR", self.dir.join("nse-state"));
        if let Some(manager) = &self.config.manager {
            cmd.env("NSM_CONNECT_TO", manager);
        }
        for (k, v) in &self.config.nse_env {
            cmd.env(k, v);
        }
        let mut nse = Process::spawn("mesh-proxy-nse", &mut cmd, &self.dir.join("nse.log"))?;
        nse.wait_for_path(&self.nse_socket(), READY_TIMEOUT)?;
        (self.config.say)(&format!(
            "mesh-proxy-nse serving {} in {} (CIDR {})",
            self.nse_url(),
            self.nse_ns.name(),
            self.config.cidr_prefix
        ));
        self.nse = Some(nse);
        Ok(())
    }

    /// The `forwarder-plugin serve` command line (root namespace).
    pub fn forwarder_command(&self) -> Result<Command, LabError> {
        let mut cmd = Command::new(process::bin("forwarder-plugin"));
        self.control_env(&mut cmd, "forwarder", FORWARDER_SPIFFE_PATH)?;
        cmd.arg("serve")
            .args(["--listen-on", &self.forwarder_url()])
            .args(match &self.config.manager {
                Some(manager) => ["--connect-to".to_owned(), manager.clone()],
                None => ["--next-hop".to_owned(), self.nse_url()],
            })
            .args([
                "--state-dir",
                &self.dir.join("forwarder-state").display().to_string(),
            ])
            // Stopping the lab undoes what it plumbed while the namespaces still exist.
            .arg("--cleanup-on-exit")
            .args(&self.config.forwarder_args);
        Ok(cmd)
    }

    /// Starts the forwarder in the root namespace; returns once its socket exists.
    pub fn start_forwarder(&mut self) -> Result<(), LabError> {
        let mut cmd = self.forwarder_command()?;
        let mut fwd = Process::spawn(
            "forwarder-plugin serve",
            &mut cmd,
            &self.dir.join("forwarder.log"),
        )?;
        fwd.wait_for_path(&self.forwarder_socket(), READY_TIMEOUT)?;
        (self.config.say)(&format!(
            "forwarder-plugin serve on {} (root namespace, namespaces only through fds) -> {}",
            self.forwarder_url(),
            self.nse_url()
        ));
        self.forwarder = Some(fwd);
        Ok(())
    }

    pub fn nse(&mut self) -> Option<&mut Process> {
        self.nse.as_mut()
    }

    pub fn forwarder(&mut self) -> Option<&mut Process> {
        self.forwarder.as_mut()
    }

    /// A new client namespace (`mp-client-<pid>[-n]`), lo up, nothing else.
    pub fn client(&self) -> Result<Namespace, LabError> {
        Ok(Namespace::create("mp-client")?)
    }

    /// Joins `client` to the nse namespace with a plain veth of our own (no
    /// NSM): `to-nse` [`STATIC_CLIENT_IP`]/24 in the client ⇄
    /// [`STATIC_CLIENT_LINK`] 198.19.1.1/24 in the nse namespace, and a
    /// client route to the server's subnet through it. For checking the data
    /// path (proxy, rules) without the control plane.
    pub fn attach_static_client(&self, client: &Namespace) -> Result<(), LabError> {
        let gw = Ipv4Addr::new(198, 19, 1, 1);
        let nse = &self.nse_ns;
        client.ip(&format!(
            "link add {SERVER_TO_NSE} type veth peer name {STATIC_CLIENT_LINK} netns {}",
            nse.name()
        ))?;
        client.ip(&format!("link set {SERVER_TO_NSE} addrgenmode none"))?;
        nse.ip(&format!("link set {STATIC_CLIENT_LINK} addrgenmode none"))?;
        client.ip(&format!(
            "addr add {STATIC_CLIENT_IP}/24 dev {SERVER_TO_NSE}"
        ))?;
        client.ip(&format!("link set {SERVER_TO_NSE} up"))?;
        nse.ip(&format!("addr add {gw}/24 dev {STATIC_CLIENT_LINK}"))?;
        nse.ip(&format!("link set {STATIC_CLIENT_LINK} up"))?;
        client.ip(&format!("route add {SERVER_NET} via {gw}"))?;
        Ok(())
    }

    /// Gives `client` a pod's own network: `eth0` on the node's bridge with
    /// the next free addresses of 198.19.200.0/24 and fd00:200::/64, and
    /// default routes via the node. (What a cluster's CNI gives every pod
    /// before NSM adds its interface.)
    pub fn attach_pod_network(&self, client: &Namespace) -> Result<PodNetwork, LabError> {
        let n = self.pods.fetch_add(1, Ordering::Relaxed);
        if n >= MAX_PODS {
            return Err(LabError::TooManyPods);
        }
        let host = u8::try_from(10 + n).map_err(|_| LabError::TooManyPods)?;
        let pod = PodNetwork {
            ip: Ipv4Addr::new(198, 19, 200, host),
            ip6: Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, u16::from(host)),
        };
        let peer = format!("pod{n}");
        client.ip(&format!(
            "link add eth0 type veth peer name {peer} netns {}",
            self.node_ns.name()
        ))?;
        client.ip("link set eth0 addrgenmode none")?;
        self.node_ns.ip(&format!(
            "link set {peer} addrgenmode none master {POD_BRIDGE} up"
        ))?;
        client.ip(&format!("addr add {}/24 dev eth0", pod.ip))?;
        client.ip(&format!("-6 addr add {}/64 dev eth0 nodad", pod.ip6))?;
        client.ip("link set eth0 up")?;
        client.ip(&format!("route add default via {NODE_IP} dev eth0"))?;
        client.ip(&format!("-6 route add default via {NODE_IP6} dev eth0"))?;
        Ok(pod)
    }

    /// nsc-init options for a client of this lab (connecting to nsmgr in an
    /// NSM lab, else to the forwarder; with its own SVID,
    /// `spiffe://k8s.nsm/ns/default/pod/<name>`, in a secure lab).
    pub fn nsc_options(&self, name: &str) -> Result<NscOptions, LabError> {
        // In an NSM lab clients ask nsmgr, as pods do; else the forwarder.
        let connect_to = match &self.config.manager {
            Some(manager) => manager.clone(),
            None => self.forwarder_url(),
        };
        let mut opts = NscOptions::new(&connect_to, name);
        opts.identity =
            self.identity_env(&format!("nsc-{name}"), &format!("/ns/default/pod/{name}"))?;
        Ok(opts)
    }

    /// Every `proxy: <client> -> <dst>` line the proxy logged so far.
    pub fn proxy_lines(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.proxy
            .log()
            .lines()
            .filter_map(parse_log_line)
            .collect()
    }

    /// `GET /` from `client` to the server, which must have gone through the
    /// endpoint's proxy: the server saw the endpoint's address, not the
    /// client's. Err says what happened instead (with the lab's logs).
    pub fn get_through_proxy(
        &self,
        client: &Namespace,
        timeout: Duration,
    ) -> Result<crate::traffic::Exchange, String> {
        let ex = crate::traffic::http_get(client, server_addr(), timeout)
            .map_err(|e| format!("TCP from {}: {e}{}", client.name(), self.logs()))?;
        if ex.server_saw.ip() != NSE_UPLINK {
            return Err(format!(
                "the server saw {} from {}, not the proxy's {NSE_UPLINK}: the proxy was bypassed{}",
                ex.server_saw,
                client.name(),
                self.logs()
            ));
        }
        Ok(ex)
    }

    /// A TCP connection from `client` to the server on `port`, held open
    /// (both ends), e.g. to see it survive a proxy's upgrade.
    pub fn hold(&self, client: &Namespace, port: u16) -> std::io::Result<HeldConnection> {
        let target = SocketAddr::from((SERVER_IP, port));
        let listener = self
            .server_ns
            .run(move || std::net::TcpListener::bind(target))
            .map_err(std::io::Error::other)??;
        let app = client
            .run(move || std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)))
            .map_err(std::io::Error::other)??;
        let (server, peer) = listener.accept()?;
        server.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(HeldConnection { app, server, peer })
    }

    /// The destination the proxy logged for a connection from `client`.
    pub fn proxy_saw(&self, client: SocketAddr) -> Option<SocketAddr> {
        find_in_log(&self.proxy.log(), client)
    }

    /// The last log lines of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let procs = [
            self.forwarder.as_ref(),
            self.nse.as_ref(),
            Some(&self.proxy),
            Some(&self.server),
            Some(&self.node),
        ];
        for p in procs.into_iter().flatten() {
            out.push_str(&format!(
                "\n--- {} ({}): {}",
                p.name(),
                p.log_path().display(),
                p.tail()
            ));
        }
        out
    }
}

/// A connection [`Lab::hold`] keeps open.
pub struct HeldConnection {
    pub app: std::net::TcpStream,
    pub server: std::net::TcpStream,
    /// The source the server saw (a proxy's, when one is in the path).
    pub peer: SocketAddr,
}

impl HeldConnection {
    /// Sends `msg` from the app; the server must receive it whole.
    pub fn echo(&mut self, msg: &[u8]) -> std::io::Result<()> {
        use std::io::{Read, Write};
        self.app.write_all(msg)?;
        let mut got = vec![0; msg.len()];
        self.server.read_exact(&mut got)?;
        if got != msg {
            return Err(std::io::Error::other("the server got other bytes"));
        }
        Ok(())
    }
}
