//! Chaos: the endpoint or the forwarder is killed (SIGKILL) while many
//! clients' Requests are in flight, then started again as it was. Whatever
//! each client was told must hold: a connection reported established still
//! sends its TCP through the proxy (adopted by the restarted process), a
//! refused one left nothing in the client; Close of every established one
//! leaves the endpoint's namespace as it was and no client an interface.

use std::time::Duration;

use examples::inspect;
use examples::lab::{Lab, LabConfig};
use examples::namespace::Namespace;
use examples::proxy::ProxyKind;
use forwarder_plugin::netns::Netns;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const CLIENTS: usize = 100;
const UP: Duration = Duration::from_secs(30);

/// Where the kill lands: after a random number of answers in `answers`,
/// then a random part of `more`; `CHAOS_SEED` replays a run (its seed is
/// printed).
fn kill_point(answers: std::ops::RangeInclusive<usize>, more: Duration) -> (usize, Duration) {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("CHAOS_SEED={seed}");
    // xorshift64*: enough to spread kill points, and replayable.
    let mut x = seed;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let span = (answers.end() - answers.start() + 1) as u64;
    let after = answers.start() + (next() % span) as usize;
    let more = Duration::from_micros(next() % (more.as_micros() as u64).max(1));
    (after, more)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Victim {
    Endpoint,
    Forwarder,
}

/// Each is killed at a random point of a burst of 100 Requests. The
/// endpoint answers long before its callers hear back (the forwarder's
/// plumbing is most of a Request), so its kill lands at a random time in
/// the burst's first 1.5 s (here the answers come from ~1.1 s to ~1.6 s);
/// the forwarder's after 1 to 90 answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_killed_during_concurrent_requests() {
    chaos(
        Victim::Endpoint,
        kill_point(0..=0, Duration::from_millis(1500)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_killed_during_concurrent_requests() {
    chaos(
        Victim::Forwarder,
        kill_point(1..=CLIENTS * 9 / 10, Duration::from_millis(1)),
    )
    .await;
}

async fn chaos(victim: Victim, (kill_at, extra): (usize, Duration)) {
    if !nsm_tests::require_root("chaos") {
        return;
    }
    let mut lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let client = lab.direct_client("chaos");
    let spaces: Vec<Namespace> = (0..CLIENTS).map(|_| lab.client().unwrap()).collect();
    let handles: Vec<Netns> = spaces
        .iter()
        .map(|ns| Netns::open(ns.name()).unwrap())
        .collect();

    let pid = Pid::from_raw(match victim {
        Victim::Endpoint => lab.nse().unwrap().pid(),
        Victim::Forwarder => lab.forwarder().unwrap().pid(),
    } as i32);
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let killer = {
        let answered = answered.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            while answered.load(std::sync::atomic::Ordering::SeqCst) < kill_at
                && start.elapsed() < UP
            {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            tokio::time::sleep(extra).await;
            kill(pid, Signal::SIGKILL).unwrap();
            answered.load(std::sync::atomic::Ordering::SeqCst)
        })
    };
    let burst = std::time::Instant::now();
    let requests = handles.iter().enumerate().map(|(i, netns)| {
        let (client, answered) = (&client, answered.clone());
        async move {
            let res = client
                .request(netns, &format!("chaos-{i}"), "mesh-proxy", "nsm-1", &[])
                .await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (res, burst.elapsed())
        }
    });
    let (results, took): (Vec<_>, Vec<_>) = futures::future::join_all(requests)
        .await
        .into_iter()
        .unzip();
    let at = killer.await.unwrap();
    let established = results.iter().filter(|r| r.is_ok()).count();
    eprintln!(
        "{victim:?} killed after {at} answers (+{extra:?}): {established} of {CLIENTS} established; answers from {:?} to {:?}",
        took.iter().min(),
        took.iter().max()
    );

    let proc = match victim {
        Victim::Endpoint => lab.nse(),
        Victim::Forwarder => lab.forwarder(),
    }
    .unwrap();
    proc.wait(UP).unwrap_or_else(|e| panic!("{e}"));
    let log_len = proc.log().len();
    match victim {
        Victim::Endpoint => lab.start_nse(),
        Victim::Forwarder => lab.start_forwarder(),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    match victim {
        Victim::Endpoint => lab.nse(),
        Victim::Forwarder => lab.forwarder(),
    }
    .unwrap()
    .wait_until("its start-up", UP, |p| {
        p.log()[log_len..].contains("serving ").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));

    let proxied = |i: usize, ns: &Namespace, what: &str| {
        if let Err(e) = lab.get_through_proxy(ns, Duration::from_secs(5)) {
            panic!("chaos-{i} {what}: {e}");
        }
    };
    let mut conns = Vec::new();
    for (i, ((ns, netns), res)) in spaces.iter().zip(&handles).zip(results).enumerate() {
        let conn = match res {
            Ok(conn) => {
                proxied(i, ns, "was established");
                conn
            }
            Err(e) => {
                // The endpoint died under it: the forwarder rolled back. (The
                // forwarder itself dying may leave its plumbing, which it
                // adopts: the client's retry below takes it back.)
                if victim == Victim::Endpoint {
                    assert!(
                        inspect::link(ns, "nsm-1").unwrap().is_none(),
                        "chaos-{i} was refused ({e}) but has an interface"
                    );
                }
                // As NSM's clients do: ask again, with the same id.
                let conn = client
                    .request(netns, &format!("chaos-{i}"), "mesh-proxy", "nsm-1", &[])
                    .await
                    .unwrap_or_else(|e| panic!("chaos-{i}'s retry: {e}{}", lab.logs()));
                proxied(i, ns, "retried");
                conn
            }
        };
        conns.push(conn);
    }

    for (i, conn) in conns.iter().enumerate() {
        client
            .close(conn)
            .await
            .unwrap_or_else(|e| panic!("Close of chaos-{i}: {e}{}", lab.logs()));
    }
    // An answer the dead forwarder never read leaves a connection no Close
    // names: the endpoint closes it once its caller's deadline has passed
    // with no interface built (15 s request timeout + 5 s grace).
    if let Err(left) = inspect::wait_nse_back_to(&lab.nse_ns, &before, Duration::from_secs(30)) {
        panic!(
            "the endpoint's namespace after every Close: {left:?}{}",
            lab.logs()
        );
    }
    for ns in &spaces {
        assert!(
            inspect::link(ns, "nsm-1").unwrap().is_none(),
            "{} keeps nsm-1",
            ns.name()
        );
    }
}
