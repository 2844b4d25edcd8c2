//! Soak (issue 12): the real endpoint in placement proxy — every Request
//! adds its interface to the table's set in the endpoint's namespace, every
//! Close takes it out — through many Request/Close cycles, with its
//! descriptors, threads and resident memory sampled: flat once warm, and
//! nothing left in its namespace or state at the end. Then a crowd of
//! connections opened at once and all Closed: the memory they took is
//! given back.
//!
//! `SOAK_CYCLES` sets the number of cycles (default 10,000; the issue's
//! full run is 100,000) and `SOAK_SECONDS` bounds the time (default 60):
//! the test stops at whichever comes first, and says which.

mod nse_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nse_support::*;
use nsm_api::connection::MonitorScopeSelector;

/// A field of `/proc/<pid>/status` (e.g. `VmRSS` in KiB, `Threads`).
fn status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    cycles: usize,
    fds: usize,
    threads: u64,
    rss_kib: u64,
}

fn sample(nse: &Nse, cycles: usize) -> Sample {
    Sample {
        cycles,
        fds: nse.fds(),
        threads: status(nse.pid(), "Threads"),
        // Anonymous memory: what connections allocate (file pages are the
        // binary's code, shared and reclaimable).
        rss_kib: status(nse.pid(), "RssAnon"),
    }
}

/// The endpoint once its upkeep has run (a trim, a repair) after a change.
async fn settled(nse: &Nse, cycles: usize) -> Sample {
    tokio::time::sleep(Duration::from_millis(4000)).await;
    sample(nse, cycles)
}

fn env_number(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The members of the endpoint's interface set, as `nft` lists them.
fn set_members(nse: &Nse) -> String {
    let ns = nse.netns.as_ref().expect("its namespace");
    let out = ns.exec_ok(&["nft", "list", "table", "inet", "mesh_proxy_nse"]);
    out.lines()
        .filter(|l| l.contains("elements"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_close_cycles_leave_the_endpoint_flat_and_its_namespace_clean() {
    if !nsm_tests::require_root("soak") {
        return;
    }
    let cycles = env_number("SOAK_CYCLES", 10_000) as usize;
    let budget = Duration::from_secs(env_number("SOAK_SECONDS", 60));
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.64.0/18")]).await;
    // Warm: lazily made runtime resources belong to the baseline.
    for _ in 0..200 {
        let (c, _) = nse.request(req_p()).await.expect("Request");
        nse.close(c).await.expect("Close");
    }
    let warm = settled(&nse, 0).await;
    let every = (cycles / 10).max(1);
    let started = Instant::now();
    let mut samples = vec![warm];
    let mut done = 0;
    while done < cycles && started.elapsed() < budget {
        let (c, _) = nse.request(req_p()).await.expect("Request");
        nse.close(c).await.expect("Close");
        done += 1;
        if done % every == 0 {
            samples.push(sample(&nse, done));
        }
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    let end = settled(&nse, done).await;
    samples.push(end);
    for s in &samples {
        eprintln!(
            "{:>7} cycles: {} fds, {} threads, {} KiB anonymous",
            s.cycles, s.fds, s.threads, s.rss_kib
        );
    }
    eprintln!(
        "{done} cycles in {:.1} s ({rate:.0}/s){}",
        started.elapsed().as_secs_f64(),
        if done < cycles {
            " — stopped by SOAK_SECONDS"
        } else {
            ""
        }
    );
    assert!(done >= 1000, "too few cycles to judge: {done}");
    assert!(
        end.fds <= warm.fds + 2,
        "descriptors grew: {warm:?} → {end:?}"
    );
    assert!(
        end.threads <= warm.threads + 2,
        "threads grew: {warm:?} → {end:?}"
    );
    // Flat: what the second half of the run added is within allocator
    // noise (a leak of 100 bytes a cycle would add ~0.5 MiB per 5,000).
    let half = samples[samples.len() / 2];
    assert!(
        end.rss_kib <= half.rss_kib + 2048,
        "resident memory kept growing: {half:?} → {end:?}"
    );
    let (_, state) = nse.monitor(MonitorScopeSelector::default()).await;
    assert!(state.connections.is_empty(), "connections left");
    assert_eq!(set_members(&nse), "", "interfaces left in the set");
}

fn interface(c: &nsm_api::connection::Connection) -> String {
    use nsm_api::mechanism::MechanismExt;
    c.mechanism
        .as_ref()
        .and_then(|m| m.interface_name())
        .expect("a KERNEL interface name")
        .to_owned()
}

/// Links named `names` in the endpoint's namespace (veths, whose peers
/// stay there too: these kernels have no dummy links).
fn plumb(nse: &Nse, names: &[String]) {
    let script: String = names
        .iter()
        .map(|n| {
            format!(
                "link add {n} type veth peer name p{}\n",
                &n[n.len().saturating_sub(8)..]
            )
        })
        .collect();
    batch(nse, &script);
}

/// Runs `script` with `ip -batch` in the endpoint's namespace.
fn batch(nse: &Nse, script: &str) {
    use std::io::Write;
    let ns = nse.netns.as_ref().expect("its namespace");
    let mut child = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ip -batch failed");
}

/// Opens `n` connections, `batch` at a time (their interfaces made as a
/// forwarder would), samples, Closes them all, samples once settled.
async fn crowd(nse: &Arc<Nse>, n: usize, batch: usize) -> (Sample, Sample) {
    let mut conns = Vec::with_capacity(n);
    for b in 0..n / batch {
        let opened: Vec<_> = (0..batch)
            .map(|_| {
                let nse = nse.clone();
                tokio::spawn(async move { nse.request(req_p()).await.map(|(c, _)| c) })
            })
            .collect();
        let mut names = Vec::new();
        for r in opened {
            let c = r
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("batch {b}: {e}"));
            names.push(interface(&c));
            conns.push(c);
        }
        // What a forwarder does next: their interfaces in our namespace
        // (else the endpoint closes them once the caller's deadline passed).
        plumb(nse, &names);
    }
    let peak = sample(nse, n);
    for c in conns {
        nse.close(c).await.expect("Close");
    }
    unplumb(nse);
    (peak, settled(nse, n).await)
}

/// Removes the links [`plumb`] made.
fn unplumb(nse: &Nse) {
    let ns = nse.netns.as_ref().expect("its namespace");
    let links = ns.exec_ok(&["ip", "-o", "link", "show", "type", "veth"]);
    let script: String = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1)?.split('@').next())
        .filter(|n| n.starts_with("mesh-proxy-"))
        .map(|n| format!("link del {n}\n"))
        .collect();
    batch(nse, &script);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_connections_closed_gives_its_memory_back() {
    if !nsm_tests::require_root("soak") {
        return;
    }
    const CROWD: usize = 1000;
    const BATCH: usize = 50;
    let nse = Arc::new(Nse::start(&[("NSM_CIDR_PREFIX", "198.18.64.0/18")]).await);
    for _ in 0..50 {
        let (c, _) = nse.request(req_p()).await.expect("Request");
        nse.close(c).await.expect("Close");
    }
    let before = settled(&nse, 0).await;
    let (peak, after) = crowd(&nse, CROWD, BATCH).await;
    // A second crowd: what the first left is reused, not added to.
    let (peak2, after2) = crowd(&nse, CROWD, BATCH).await;
    eprintln!(
        "before {before:?}\npeak   {peak:?}\nafter  {after:?}\npeak2  {peak2:?}\nafter2 {after2:?}"
    );
    let grown = peak.rss_kib.saturating_sub(before.rss_kib);
    let given_back = peak.rss_kib.saturating_sub(after.rss_kib);
    assert!(
        grown >= 1024,
        "{CROWD} connections should take memory to give back: {before:?} → {peak:?}"
    );
    // glibc keeps part of it in its arenas (what is free between live
    // chunks); measured here: about half comes back.
    assert!(
        given_back * 3 >= grown,
        "at least a third of what {CROWD} connections took comes back once they close: took {grown} KiB, {given_back} KiB back"
    );
    // A leak of more than ~6 KiB a connection would show here.
    assert!(
        after2.rss_kib <= after.rss_kib + grown / 4,
        "a second crowd reuses what the first left, it does not add to it: {after:?} → {after2:?}"
    );
    assert!(
        after.fds <= before.fds + 2,
        "descriptors: {before:?} → {after:?}"
    );
}
