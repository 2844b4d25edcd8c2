//! `forwarder-plugin rules {render,apply,verify,reconcile,cleanup}`.
//!
//! Inputs are checked in the order spec → namespace → backend, and nothing
//! touches the namespace before all of them are valid.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use forwarder_plugin::netns::{Netns, NetnsError};
use forwarder_plugin::rules::{
    self, Backend, BackendKind, BackendOptions, Outcome, Owner, Plan, RedirectSpec, RenderBackend,
    RulesError, Variant,
};

/// Exit codes, also listed in `--help`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const DRIFT: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const BAD_SPEC: u8 = 64;
    pub const NETNS: u8 = 65;
    pub const NO_INPUT: u8 = 66;
    pub const UNAVAILABLE: u8 = 69;
    pub const KERNEL: u8 = 70;
}

const EXIT_CODES: &str = "\
Exit codes:
   0  success (verify: the namespace matches the spec)
   1  verify found drift (printed one item per line)
   2  usage error (unknown option, missing argument, verify with --backend render)
  64  invalid spec: unknown field, port out of range, bad CIDR, bad interface name, …
  65  network namespace not found, or not a network namespace
  66  spec file cannot be read
  69  a tool the backend needs is missing (iptables-restore, ip)
  70  the kernel or a tool refused the change (nothing of ours is left behind)

The spec is JSON or YAML with istio's options (camelCase), e.g.
  {\"version\": 1, \"mode\": \"redirect\", \"outboundPort\": 15001, \"inboundPort\": 15006,
   \"proxyUids\": [1337], \"excludeOutboundCidrs\": [\"10.0.0.0/8\"], \"captureDns\": true}
Unset fields take istio's defaults; unknown fields are rejected. The format is
version 1 (forwarder-plugin/docs/redirect-spec.md).";

#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct RulesArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Print what apply would install (nft script or iptables-restore input); touches nothing.
    Render(RenderArgs),
    /// Install the spec's rules, replacing ours if present (atomic, idempotent).
    Apply(NsArgs),
    /// Compare the namespace with the spec; exit 1 and list the drift if they differ.
    Verify(NsArgs),
    /// Verify, and re-apply if the namespace drifted.
    Reconcile(NsArgs),
    /// Remove everything of ours: table or chains, rules, ip rules, routes.
    Cleanup(CleanupArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    /// nftables over netlink, in process (default).
    Nft,
    /// iptables-restore / ip6tables-restore.
    Iptables,
    /// Print instead of applying (nft syntax).
    Render,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum VariantArg {
    Legacy,
    Nft,
}

#[derive(Args, Debug)]
struct Common {
    /// Backend that talks to the kernel.
    #[arg(long, value_enum, default_value_t = BackendArg::Nft)]
    backend: BackendArg,
    /// iptables backend: use this variant instead of detecting the one the namespace uses.
    #[arg(long, value_enum)]
    iptables_variant: Option<VariantArg>,
    /// Name of our nft table / iptables chain prefix / rule tags.
    #[arg(long, default_value = Owner::DEFAULT, value_parser = parse_owner)]
    owner: Owner,
}

#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
struct RenderArgs {
    /// Redirect spec file (JSON or YAML; `-` reads stdin).
    #[arg(long)]
    spec: PathBuf,
    /// Output format: `nft` (an `nft -f` script) or `iptables` (iptables-restore input).
    #[arg(long, value_enum, default_value_t = BackendArg::Nft)]
    backend: BackendArg,
    #[arg(long, default_value = Owner::DEFAULT, value_parser = parse_owner)]
    owner: Owner,
}

#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
struct NsArgs {
    /// Network namespace: a name under /run/netns, a path (/proc/PID/ns/net) or inode://DEV/INO.
    #[arg(long)]
    netns: String,
    /// Redirect spec file (JSON or YAML; `-` reads stdin).
    #[arg(long)]
    spec: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
struct CleanupArgs {
    /// Network namespace: a name under /run/netns, a path (/proc/PID/ns/net) or inode://DEV/INO.
    #[arg(long)]
    netns: String,
    /// Optional: the spec that was applied (only checked; cleanup removes everything of ours).
    #[arg(long)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

fn parse_owner(s: &str) -> Result<Owner, String> {
    Owner::new(s).map_err(|e| e.to_string())
}

/// A failure with its exit code.
struct Fail(u8, String);

impl From<RulesError> for Fail {
    fn from(e: RulesError) -> Self {
        let code = match e.root() {
            RulesError::Spec(_) | RulesError::Owner(_) => exit::BAD_SPEC,
            RulesError::Netns(n) => netns_code(n),
            RulesError::ToolMissing { .. } => exit::UNAVAILABLE,
            RulesError::Unsupported { .. } => exit::USAGE,
            _ => exit::KERNEL,
        };
        Fail(code, e.to_string())
    }
}

fn netns_code(e: &NetnsError) -> u8 {
    match e {
        NetnsError::NotFound { .. }
        | NetnsError::NotNetns { .. }
        | NetnsError::BadName(_)
        | NetnsError::Open { .. } => exit::NETNS,
        _ => exit::KERNEL,
    }
}

fn read_spec(path: &Path) -> Result<Plan, Fail> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|e| {
        Fail(
            exit::NO_INPUT,
            format!("cannot read spec {}: {e}", path.display()),
        )
    })?;
    let spec = RedirectSpec::parse(&text).map_err(|e| {
        Fail(
            exit::BAD_SPEC,
            format!("invalid redirect spec {}: {e}", path.display()),
        )
    })?;
    Plan::new(&spec).map_err(|e| Fail(exit::BAD_SPEC, format!("invalid redirect spec: {e}")))
}

fn open_netns(spec: &str) -> Result<Netns, Fail> {
    Netns::open(spec).map_err(|e| Fail(netns_code(&e), e.to_string()))
}

fn backend(c: &Common) -> Box<dyn Backend> {
    let kind = match c.backend {
        BackendArg::Nft => BackendKind::Nft,
        BackendArg::Iptables => BackendKind::Iptables,
        BackendArg::Render => BackendKind::Render(rules::RenderFormat::Nft),
    };
    rules::get_backend(
        kind,
        BackendOptions {
            owner: c.owner.clone(),
            iptables_variant: c.iptables_variant.map(|v| match v {
                VariantArg::Legacy => Variant::Legacy,
                VariantArg::Nft => Variant::Nft,
            }),
            fault: None,
            keep_socket: false,
        },
    )
}

pub fn run(args: RulesArgs) -> ExitCode {
    let result = match args.action {
        Action::Render(a) => render(a),
        Action::Apply(a) => apply(a),
        Action::Verify(a) => verify(a, false),
        Action::Reconcile(a) => verify(a, true),
        Action::Cleanup(a) => cleanup(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Fail(code, msg)) => {
            eprintln!("forwarder-plugin rules: {msg}");
            ExitCode::from(code)
        }
    }
}

fn render(a: RenderArgs) -> Result<u8, Fail> {
    let plan = read_spec(&a.spec)?;
    let format = match a.backend {
        BackendArg::Iptables => rules::RenderFormat::Iptables,
        BackendArg::Nft | BackendArg::Render => rules::RenderFormat::Nft,
    };
    let r = RenderBackend::new(format, a.owner, Box::new(std::io::stdout()));
    print!("{}", r.text(&plan));
    Ok(exit::OK)
}

fn apply(a: NsArgs) -> Result<u8, Fail> {
    let plan = read_spec(&a.spec)?;
    let ns = open_netns(&a.netns)?;
    let b = backend(&a.common);
    let outcome = b.apply(&ns, &plan)?;
    match outcome {
        Outcome::Applied => eprintln!(
            "applied {} rules with {} in network namespace {}",
            plan.rules.len(),
            b.name(),
            ns.id()
        ),
        Outcome::Unchanged => eprintln!(
            "already applied ({}): nothing changed in network namespace {}",
            b.name(),
            ns.id()
        ),
        Outcome::Rendered => {}
    }
    Ok(exit::OK)
}

fn verify(a: NsArgs, reconcile: bool) -> Result<u8, Fail> {
    let plan = read_spec(&a.spec)?;
    let ns = open_netns(&a.netns)?;
    let b = backend(&a.common);
    if reconcile {
        let drift = rules::reconcile(b.as_ref(), &ns, &plan)?;
        if drift.is_empty() {
            eprintln!("no drift in network namespace {}", ns.id());
        } else {
            println!("{drift}");
            eprintln!(
                "re-applied: {} difference(s) repaired in network namespace {}",
                drift.items.len(),
                ns.id()
            );
        }
        return Ok(exit::OK);
    }
    let drift = b.verify(&ns, &plan)?;
    if drift.is_empty() {
        eprintln!("no drift in network namespace {}", ns.id());
        Ok(exit::OK)
    } else {
        println!("{drift}");
        Ok(exit::DRIFT)
    }
}

fn cleanup(a: CleanupArgs) -> Result<u8, Fail> {
    if let Some(spec) = &a.spec {
        read_spec(spec)?;
    }
    let ns = open_netns(&a.netns)?;
    backend(&a.common).cleanup(&ns)?;
    eprintln!(
        "removed everything of ours from network namespace {}",
        ns.id()
    );
    Ok(exit::OK)
}
