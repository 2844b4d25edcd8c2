//! Applying istio's default rule set to a fresh namespace, three ways, side
//! by side in one run:
//!   (a) our nft backend (one netlink transaction, in process),
//!   (b) our iptables backend (iptables-save check + one iptables-restore
//!       per family), with the variant detected and forced,
//!   (c) one `iptables` process per chain and rule, as linkerd's proxy-init
//!       does (same rules, from the same plan).
//! Each sample uses a namespace of its own (unshare + bind mount) and times
//! the apply only. Needs root; `RULES_BENCH_RUNS` sets the sample count
//! (default 50).
//!
//! cargo bench -p forwarder-plugin --bench rules_apply

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forwarder_plugin::netns::Netns;
use forwarder_plugin::rules::{
    self, BackendKind, BackendOptions, Owner, Plan, RedirectSpec, Variant, plan::Family, render,
};

struct Case {
    name: &'static str,
    samples: Vec<Duration>,
    run: Box<dyn Fn(&Netns)>,
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

fn exec(ns: &Netns, program: &PathBuf, args: &[String]) {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    ns.enter_in_child(&mut cmd);
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let is_root = nix::unistd::Uid::effective().is_root();
    if !is_root {
        eprintln!("rules_apply: needs root (creates network namespaces); skipped");
        return;
    }
    let runs: usize = std::env::var("RULES_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let plan = Plan::new(&RedirectSpec::default()).expect("defaults are valid");
    let owner = Owner::default();
    let argv = render::iptables_argv(&plan, &owner, Family::V4);
    let iptables_nft = tool("iptables-nft").expect("iptables-nft installed");
    let save_nft = tool("iptables-nft-save").expect("iptables-nft-save installed");

    let backend = |kind, variant| {
        rules::get_backend(
            kind,
            BackendOptions {
                iptables_variant: variant,
                ..Default::default()
            },
        )
    };
    let nft = backend(BackendKind::Nft, None);
    let ipt_auto = backend(BackendKind::Iptables, None);
    let ipt_nft = backend(BackendKind::Iptables, Some(Variant::Nft));
    let (p1, p2, p3) = (plan.clone(), plan.clone(), plan.clone());
    let mut cases = vec![
        Case {
            name: "(a) nft backend (netlink, 1 transaction)",
            samples: Vec::new(),
            run: Box::new(move |ns| {
                nft.apply(ns, &p1).expect("nft apply");
            }),
        },
        Case {
            name: "(b) iptables backend (variant detected)",
            samples: Vec::new(),
            run: Box::new(move |ns| {
                ipt_auto.apply(ns, &p2).expect("iptables apply");
            }),
        },
        Case {
            name: "(b') iptables backend (--iptables-variant nft)",
            samples: Vec::new(),
            run: Box::new(move |ns| {
                ipt_nft.apply(ns, &p3).expect("iptables apply");
            }),
        },
        Case {
            name: "(c) one iptables-nft process per rule (linkerd)",
            samples: Vec::new(),
            run: Box::new(move |ns| {
                // proxy-init reads the nat table first, then runs each command.
                exec(ns, &save_nft, &["-t".into(), "nat".into()]);
                for a in &argv {
                    exec(ns, &iptables_nft, a);
                }
            }),
        },
    ];

    eprintln!(
        "rules_apply: istio default spec = {} rules in {} chains; {runs} runs per case, fresh namespace each",
        plan.rules.len(),
        plan.chains().len()
    );
    for i in 0..runs {
        // Interleaved, so machine noise hits every case alike.
        for (c, case) in cases.iter_mut().enumerate() {
            let name = format!("rbench{}x{i}x{c}", std::process::id());
            let ns = Netns::create_named(&name).expect("create namespace");
            let t0 = Instant::now();
            (case.run)(&ns);
            case.samples.push(t0.elapsed());
            drop(ns);
            Netns::delete_named(&name).expect("delete namespace");
        }
    }

    println!();
    println!(
        "{:<50} {:>6} {:>11} {:>11} {:>11} {:>9}",
        "applying istio's default rules", "runs", "median ms", "p99 ms", "mean ms", "vs (a)"
    );
    let mut medians = Vec::new();
    for case in &mut cases {
        case.samples.sort();
        let median = percentile(&case.samples, 50.0);
        medians.push(median);
        let mean = case.samples.iter().sum::<Duration>() / case.samples.len() as u32;
        println!(
            "{:<50} {:>6} {:>11.3} {:>11.3} {:>11.3} {:>8.1}x",
            case.name,
            case.samples.len(),
            ms(median),
            ms(percentile(&case.samples, 99.0)),
            ms(mean),
            ms(median) / ms(medians[0]),
        );
    }
    let a = ms(medians[0]);
    println!();
    println!(
        "goal (a) >= 5x faster than (b): {:.1}x {}",
        ms(medians[1]) / a,
        if ms(medians[1]) / a >= 5.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "goal (a) >= 50x faster than (c): {:.1}x {}",
        ms(medians[3]) / a,
        if ms(medians[3]) / a >= 50.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}
