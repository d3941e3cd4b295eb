use super::*;

const DEST: &[(&str, &str)] = &[("reporter", "destination")];

/// Value of the series `name` whose labels include every pair in `labels`.
fn sample(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = m.encode();
    let line = text.lines().find(|l| {
        let series = l.split(['{', ' ']).next();
        series == Some(name)
            && labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
    })?;
    line.rsplit(' ').next()?.parse().ok()
}

fn labels() -> ConnectionLabels {
    let src = PeerLabels {
        workload: "sleep".into(),
        namespace: "default".into(),
        principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
        ..Default::default()
    };
    let dst = PeerLabels {
        workload: "httpbin".into(),
        ..Default::default()
    };
    let svc = ServiceLabels {
        hostname: "httpbin.default.svc.cluster.local".into(),
        namespace: "default".into(),
        name: "httpbin".into(),
    };
    let mut l = reporter_labels(Some(Reporter::Destination), &src, &dst, &svc);
    l.connection_security_policy = "mutual_tls".into();
    l
}

#[test]
fn encode_reports_open_close_and_bytes_with_istio_labels() {
    let m = Metrics::new();
    let mut conn = m.open_connection(&labels());
    conn.record_bytes(10, 20);
    conn.record_bytes(5, 1);
    conn.close();
    let sel = [
        ("reporter", "destination"),
        ("source_workload", "sleep"),
        ("destination_service", "httpbin.default.svc.cluster.local"),
        ("destination_service_name", "httpbin"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("source_app", "unknown"),
    ];
    let opened = sample(&m, "istio_tcp_connections_opened_total", &sel);
    assert_eq!(opened, Some(1.0));
    let closed = sample(&m, "istio_tcp_connections_closed_total", &sel);
    assert_eq!(closed, Some(1.0));
    let received = sample(&m, "istio_tcp_received_bytes_total", &sel);
    assert_eq!(received, Some(15.0));
    assert_eq!(sample(&m, "istio_tcp_sent_bytes_total", &sel), Some(21.0));
    let text = m.encode();
    for name in CONNECTION_LABEL_NAMES {
        assert!(text.contains(&format!("{name}=\"")), "missing label {name}");
    }
}

#[test]
fn close_then_drop_counts_closed_once() {
    let m = Metrics::new();
    let mut conn = m.open_connection(&labels());
    conn.close();
    conn.close();
    drop(conn);
    let closed = sample(&m, "istio_tcp_connections_closed_total", DEST);
    assert_eq!(closed, Some(1.0));
}

#[test]
fn drop_alone_counts_closed() {
    let m = Metrics::new();
    let first = m.open_connection(&labels());
    let _second = m.open_connection(&labels());
    assert_eq!(
        sample(&m, "istio_tcp_connections_opened_total", DEST),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "istio_tcp_connections_closed_total", DEST),
        Some(0.0)
    );
    drop(first);
    assert_eq!(
        sample(&m, "istio_tcp_connections_closed_total", DEST),
        Some(1.0)
    );
}

#[test]
fn build_info_and_auxiliary_counters_are_exported() {
    let m = Metrics::new();
    m.connection_failed(&ConnectionLabels::default());
    m.xds_message("type.googleapis.com/istio.workload.Address");
    m.xds_nack("type.googleapis.com/istio.security.Authorization");
    m.xds_connection_terminated("error");
    m.hbone_rejected("rbac");
    m.tls_handshake_failure("hbone");
    m.config_error("xds");
    m.certificate_rotated();
    m.connection_closed_by_policy();
    let build = [("component", "ztunnel"), ("tag", env!("CARGO_PKG_VERSION"))];
    let expected: [(&str, &[(&str, &str)]); 11] = [
        ("istio_build", &build),
        (
            "istio_tcp_connections_failed_total",
            &[("reporter", "unknown")],
        ),
        (
            "istio_xds_message_total",
            &[("url", "type.googleapis.com/istio.workload.Address")],
        ),
        (
            "istio_xds_nack_total",
            &[("url", "type.googleapis.com/istio.security.Authorization")],
        ),
        (
            "istio_xds_connection_terminations_total",
            &[("reason", "error")],
        ),
        ("ztunnel_hbone_rejected_total", &[("reason", "rbac")]),
        (
            "ztunnel_tls_handshake_failures_total",
            &[("listener", "hbone")],
        ),
        ("ztunnel_config_errors_total", &[("source", "xds")]),
        ("ztunnel_certificate_rotations_total", &[]),
        ("ztunnel_connections_closed_by_policy_total", &[]),
        ("istio_tcp_connections_opened_total", &[]),
    ];
    for (name, labels) in &expected[..10] {
        assert_eq!(sample(&m, name, labels), Some(1.0), "{name}");
    }
    // Counters with no samples yet are not exported at all.
    assert_eq!(sample(&m, expected[10].0, expected[10].1), None);
}
