//! grpcfd over a real tonic server and client on a unix socket: fds travel both
//! ways beside the gRPC messages, and plain gRPC clients are unaffected.

mod support;

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nsm_api::grpcfd::{self, DEFAULT_MAX_HELD_FDS};
use nsm_api::inode::InodeUrl;
use support::*;

const WAIT: Duration = Duration::from_secs(5);

fn url(params: &std::collections::HashMap<String, String>, key: &str) -> InodeUrl {
    params
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {params:?}"))
        .parse()
        .expect("inode URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_fds_arrive_with_the_response_and_name_the_same_files() {
    let server = TestServer::start().await;
    let (mut client, fds) = grpcfd_client(&server.socket).await;

    let conn = client
        .request(request(&[("send", "netns,tempfile")]))
        .await
        .expect("request")
        .into_inner();
    let p = params(&conn);

    let netns_url = url(p, "netns");
    // Same process, same netns: the server's netns inode is ours.
    assert_eq!(netns_url, own_netns_url());
    let netns = fds.recv_fd(&netns_url, WAIT).await.expect("netns fd");
    assert_eq!(grpcfd::inode_url_of(netns.as_fd()).unwrap(), netns_url);

    let file_url = url(p, "tempfile");
    let file = fds.recv_fd(&file_url, WAIT).await.expect("tempfile fd");
    assert_eq!(grpcfd::inode_url_of(file.as_fd()).unwrap(), file_url);
    // The server unlinked and closed its copy: only the passed fd reaches the content.
    assert_eq!(read_all(file), TEMPFILE_CONTENT);

    // The fds arrived before the response bytes, so they are already there.
    assert!(fds.try_recv_fd(&netns_url).unwrap().is_some());
    assert_eq!(fds.stats().duplicates, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fds_reach_the_server_handler() {
    let server = TestServer::start().await;
    let (mut client, fds) = grpcfd_client(&server.socket).await;

    let file = temp_file(server.dir(), "sent by the client");
    let sent = fds.send_fd(file.as_fd()).expect("send_fd");
    drop(file); // the queued dup is what travels
    // Queued, or already written if the connection was writing (HTTP/2
    // settings) when it was queued: either way exactly one is on its way.
    let s = fds.stats();
    assert_eq!(s.queued as u64 + s.sent, 1, "{s:?}");

    let conn = client
        .request(request(&[("recv", &sent.to_string())]))
        .await
        .expect("request")
        .into_inner();
    assert_eq!(params(&conn)["received"], "sent by the client");
    assert_eq!((fds.stats().queued, fds.stats().sent), (0, 1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_sent_on_one_connection_is_not_visible_on_another() {
    let server = TestServer::start().await;
    let (_a, a_fds) = grpcfd_client(&server.socket).await;
    let (mut b, _b_fds) = grpcfd_client(&server.socket).await;

    let file = temp_file(server.dir(), "for a only");
    let sent = a_fds.send_fd(file.as_fd()).unwrap();
    let err = b
        .request(request(&[
            ("recv", &sent.to_string()),
            ("recv_timeout_ms", "200"),
        ]))
        .await
        .expect_err("connection b never carried the fd");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains(&sent.to_string()),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_fds_in_one_response_all_arrive() {
    let server = TestServer::start().await;
    let (mut client, fds) = grpcfd_client(&server.socket).await;
    let n = DEFAULT_MAX_HELD_FDS;

    let conn = client
        .request(request(&[("send", &format!("pipes:{n},netns"))]))
        .await
        .expect("request")
        .into_inner();
    let p = params(&conn);
    for i in 0..n {
        let u = url(p, &format!("pipe{i}"));
        let fd = fds.recv_fd(&u, WAIT).await.expect("pipe fd");
        assert_eq!(grpcfd::inode_url_of(fd.as_fd()).unwrap(), u);
    }
    // One more than the bound: the last to arrive (the netns) was closed, not held.
    let s = fds.stats();
    assert_eq!(
        (s.arrived, s.held, s.rejected, s.duplicates),
        (n as u64 + 1, n, 1, 0)
    );
    assert!(fds.try_recv_fd(&url(p, "netns")).unwrap().is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_fd_times_out_when_nothing_arrives() {
    let server = TestServer::start().await;
    let (mut client, fds) = grpcfd_client(&server.socket).await;
    client.request(request(&[])).await.expect("request");

    let never = own_netns_url();
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = fds
        .recv_fd(&never, timeout)
        .await
        .expect_err("nothing was sent");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(start.elapsed() >= timeout);
    assert!(err.to_string().contains(&never.to_string()), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_fd_gives_up_when_the_connection_ends() {
    let server = TestServer::start().await;
    let (client, fds) = grpcfd_client(&server.socket).await;
    drop(client); // the last Channel handle: the connection closes

    let err = fds
        .recv_fd(&own_netns_url(), Duration::from_secs(60))
        .await
        .expect_err("the connection is gone");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
    let file = temp_file(server.dir(), "late");
    assert_eq!(
        fds.send_fd(file.as_fd()).unwrap_err().kind(),
        io::ErrorKind::NotConnected
    );
    server.stop().await;
}

/// Every byte of `pad` came back in order.
fn assert_pad(p: &std::collections::HashMap<String, String>, len: usize) {
    let got = &p["pad"];
    assert_eq!(got.len(), len);
    assert!(
        got.chars().enumerate().all(|(i, c)| c == pad_byte(i)),
        "payload bytes were lost or changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tonic_client_works_against_the_grpcfd_server() {
    let server = TestServer::start().await;
    let mut client = plain_client(&server.socket).await;
    for _ in 0..5 {
        let conn = client
            .request(request(&[("pad", "200000")]))
            .await
            .expect("request over plain tonic")
            .into_inner();
        assert_pad(params(&conn), 200_000);
    }
    client
        .close(conn_for_close())
        .await
        .expect("close over plain tonic");
    server.stop().await;
}

fn conn_for_close() -> nsm_api::connection::Connection {
    nsm_api::connection::Connection {
        id: "plain".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_fds_still_gets_every_byte() {
    let server = TestServer::start().await;
    let mut client = fd_ignoring_client(&server.socket).await;
    // Several calls on one connection: fds the client never takes must not break the stream.
    for _ in 0..5 {
        let conn = client
            .request(request(&[
                ("send", "netns,tempfile,pipes:20"),
                ("pad", "200000"),
            ]))
            .await
            .expect("request from a client without grpcfd")
            .into_inner();
        let p = params(&conn);
        assert_eq!(p.len(), 23, "{:?}", p.keys());
        assert_pad(p, 200_000);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_fails_clearly_when_nobody_listens() {
    let dir = TempDir::new();
    let err = grpcfd::dial(dir.path().join("absent.sock"))
        .await
        .expect_err("no socket");
    let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    assert!(chain.contains("No such file"), "{chain}");
}
