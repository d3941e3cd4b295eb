//! Proxy lifecycle: SIGTERM drains (in-flight traffic completes, new connections are refused)
//! and the node agent's ZDS removals stop a pod's proxy.

mod mesh;

use std::time::{Duration, Instant};

use mesh::Options;

#[test]
fn sigterm_drains_in_flight_transfers_and_refuses_new_connections() {
    if !e2e::require_root() {
        return;
    }
    let mut mesh = mesh::start(
        10,
        Options {
            env: vec![("DRAIN_DURATION", "4s")],
            ..Default::default()
        },
    );
    let mut in_flight = mesh.check_echo();
    mesh.zt.sigterm();
    // The in-flight connection keeps working during the drain.
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let data = vec![rounds as u8; 32 * 1024];
        assert_eq!(
            in_flight.echo(&data).expect("in-flight echo during drain"),
            data
        );
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // New connections are refused: nothing listens on 15001 any more.
    let refused = mesh.connect().and_then(|mut c| c.greeting());
    assert!(refused.is_err(), "new connection accepted while draining");
    drop(in_flight);
    // With the last connection gone ztunnel exits well before the deadline.
    let status = mesh.zt.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}\n{}", mesh.zt.log());
}

#[test]
fn drain_deadline_cuts_connections_that_outlive_it() {
    if !e2e::require_root() {
        return;
    }
    let mut mesh = mesh::start(
        11,
        Options {
            env: vec![("DRAIN_DURATION", "1s")],
            ..Default::default()
        },
    );
    let mut stuck = mesh.check_echo();
    let t = Instant::now();
    mesh.zt.sigterm();
    let status = mesh.zt.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "exited before the deadline"
    );
    assert!(
        stuck.echo(b"x").is_err(),
        "connection survived the deadline"
    );
}

#[test]
fn zds_delete_stops_the_pods_proxy_and_resnapshot_keeps_the_rest() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(12, Options::default());
    mesh.check_echo();
    assert_eq!(mesh.peer.del("uid-a"), "");
    // Pod a's capture rules now lead nowhere: fail closed, never plaintext.
    let after = mesh.connect().and_then(|mut c| c.greeting());
    assert!(after.is_err(), "pod a still proxied after delete");
    // Its certificate is no longer kept or rotated.
    let dump = mesh.zt.config_dump();
    let ids: Vec<String> = dump["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["identity"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        ids,
        vec!["spiffe://cluster.local/ns/default/sa/server"],
        "{dump}"
    );
    // Re-adding pod a brings it back.
    let err = mesh
        .peer
        .add("uid-a", "a", "default", "client", &mesh.net.a.netns_fd());
    assert_eq!(err, "");
    mesh.check_echo();
}

#[test]
fn reconnecting_node_agent_snapshot_drops_pods_it_no_longer_lists() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(13, Options::default());
    mesh.check_echo();
    // The node agent restarts: ztunnel reconnects; the new snapshot only lists pod b.
    mesh.peer.shutdown();
    let peer = mesh.zds.accept();
    assert_eq!(
        peer.add("uid-b", "b", "default", "server", &mesh.net.b.netns_fd()),
        ""
    );
    assert_eq!(peer.snapshot_sent(), "");
    let after = mesh.connect().and_then(|mut c| c.greeting());
    assert!(
        after.is_err(),
        "pod a should have been dropped by the snapshot"
    );
    // Pod b kept its proxy (listeners were not rebound): plaintext from a still reaches it.
    let plain = e2e::apps::bypass_connect(&mesh.net.a.ns, mesh.server_addr())
        .and_then(e2e::apps::Client::from_stream)
        .and_then(|mut c| c.greeting());
    assert!(plain.is_ok());
}

#[test]
fn add_for_a_known_pod_with_a_new_netns_moves_its_proxy_there() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(19, Options::default());
    mesh.check_echo();
    let has_listeners = |ns: &str| e2e::netns::listens_on(ns, 15001);
    assert!(has_listeners(&mesh.net.a.ns));
    // The runtime recreated pod a's sandbox: same uid and workload, another netns.
    let fresh = format!("{}-a2", mesh.net.prefix);
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &fresh])
        .output();
    e2e::netns::sh(&["ip", "netns", "add", &fresh]);
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .output();
        }
    }
    let _cleanup = Del(fresh.clone());
    let fd: std::os::fd::OwnedFd = std::fs::File::open(format!("/run/netns/{fresh}"))
        .unwrap()
        .into();
    assert_eq!(mesh.peer.add("uid-a", "a", "default", "client", &fd), "");
    assert!(
        mesh::eventually(Duration::from_secs(5), || has_listeners(&fresh)
            && !has_listeners(&mesh.net.a.ns)),
        "proxy moved to the new netns\nnew: {}\nold: {}",
        e2e::netns::listening_tcp(&fresh),
        e2e::netns::listening_tcp(&mesh.net.a.ns)
    );
    // The same Add again (agent restart with the same sandbox) keeps it where it is.
    assert_eq!(mesh.peer.add("uid-a", "a", "default", "client", &fd), "");
    assert!(has_listeners(&fresh));
}
