//! NSM forwarders dial a fresh connection per Request, so thousands of grpcfd
//! connections come and go: none may leave an fd behind (client or server side,
//! both live in this process). Its own test binary, so no other test's fds
//! disturb the count.

mod support;

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nsm_api::inode::InodeUrl;
use support::*;

/// One NSM-like round trip on a fresh connection: the client sends an fd, the
/// server fetches it and sends a netns, a file and pipes back, the client fetches them.
async fn round_trip(socket: &Path, dir: &Path) {
    let (mut client, fds) = grpcfd_client(socket).await;
    let file = temp_file(dir, "from the client");
    let sent = fds.send_fd(file.as_fd()).expect("send_fd");
    drop(file);
    let conn = client
        .request(request(&[
            ("recv", &sent.to_string()),
            ("send", "netns,tempfile,pipes:3"),
        ]))
        .await
        .expect("request")
        .into_inner();
    let p = params(&conn);
    assert_eq!(p["received"], "from the client");
    for key in ["netns", "tempfile", "pipe0", "pipe1", "pipe2"] {
        let url: InodeUrl = p[key].parse().unwrap();
        fds.recv_fd(&url, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
}

/// Clients without grpcfd: one is sent fds it never takes, one is sent none.
async fn plain_round_trip(socket: &Path) {
    let mut client = fd_ignoring_client(socket).await;
    client
        .request(request(&[("send", "netns,tempfile,pipes:3")]))
        .await
        .expect("request from a client that ignores fds");
    let mut client = plain_client(socket).await;
    client
        .request(request(&[]))
        .await
        .expect("plain tonic request");
}

/// Waits (bounded) for closing connections to finish; returns the last count.
async fn settled_fd_count(target: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = fd_count();
        if n <= target || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fd count once it has not changed for a few samples (warm-up connections closed).
async fn stable_fd_count() -> usize {
    let mut last = fd_count();
    let mut same = 0;
    while same < 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = fd_count();
        same = if n == last { same + 1 } else { 0 };
        last = n;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_connections_leave_no_fds_behind() {
    let server = TestServer::start().await;
    let socket = server.socket.clone();
    let dir = server.dir().to_path_buf();
    // Warm up (runtime internals, lazily opened files) before taking the baseline.
    round_trip(&socket, &dir).await;
    plain_round_trip(&socket).await;
    let baseline = stable_fd_count().await;

    let start = Instant::now();
    for _ in 0..200 {
        round_trip(&socket, &dir).await;
    }
    let sequential = start.elapsed();

    let start = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (socket, dir) = (socket.clone(), dir.clone());
            tokio::spawn(async move { round_trip(&socket, &dir).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("concurrent round trip");
    }
    let concurrent = start.elapsed();

    for _ in 0..50 {
        plain_round_trip(&socket).await;
    }

    let after = settled_fd_count(baseline).await;
    eprintln!(
        "grpcfd: 200 sequential round trips {sequential:?} ({:?} each), 50 concurrent {concurrent:?}; fds {baseline} -> {after}",
        sequential / 200
    );
    assert!(
        after <= baseline,
        "fd leak: {baseline} fds before, {after} after 300 connections"
    );
    server.stop().await;
}
