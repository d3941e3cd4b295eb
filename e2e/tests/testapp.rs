//! Loopback tests of the `mesh-testapp` binary: serve + call over HTTP/1.1, h2c, gRPC and TCP.
//! No root needed; every server is a child process killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-testapp");

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `serve`; killed (and reaped) when dropped.
struct Server {
    child: Child,
    http: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `serve` named `name` on a fresh HTTP port plus `extra` flags; waits until `ready`
/// ports (and the HTTP port) accept connections.
fn serve(name: &str, extra: &[&str], ready: &[u16]) -> Server {
    let http = free_port();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--name",
            name,
            "--namespace",
            "testns",
        ])
        .args(["--version", "v1", "--http-port", &http.to_string()])
        .args(extra)
        .env_remove("POD_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child, http };
    wait_for_port(http);
    for p in ready {
        wait_for_port(*p);
    }
    server
}

/// Runs `mesh-testapp call ...`.
fn call(args: &[&str]) -> Output {
    Command::new(BIN).arg("call").args(args).output().unwrap()
}

/// Runs `call ... --json` and parses the summary.
fn call_json(args: &[&str]) -> (Value, bool) {
    let out = call(&[args, &["--json"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "bad summary {text:?}: {e}; stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}

/// Plain HTTP/1.1 request over a std socket (independent of the app's own client).
/// Returns the status code and the JSON body.
fn http1(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status: u16 = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (_, body) = resp.split_once("\r\n\r\n").unwrap();
    (
        status,
        serde_json::from_str(body.trim()).unwrap_or(Value::Null),
    )
}

#[test]
fn http1_reply_describes_pod_peer_and_headers() {
    let srv = serve("web-0", &[], &[]);
    let (status, v) = http1(srv.http, "/hello?x=1", &[("X-Request-Id", "req-1")]);
    assert_eq!(status, 200);
    assert_eq!(v["pod"], "web-0");
    assert_eq!(v["namespace"], "testns");
    assert_eq!(v["version"], "v1");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/hello?x=1");
    assert_eq!(v["headers"]["x-request-id"], "req-1");
    assert_eq!(v["upstream"], Value::Array(vec![]));
    assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
}

#[test]
fn http2_prior_knowledge_is_served_on_the_same_port() {
    let srv = serve("web-h2", &[], &[]);
    let url = format!("http://127.0.0.1:{}/h2", srv.http);
    let (v, ok) = call_json(&[&url, "--http2", "-H", "x-custom: yes"]);
    assert!(ok, "{v}");
    assert_eq!(v["body"]["protocol"], "HTTP/2.0");
    assert_eq!(v["body"]["headers"]["x-custom"], "yes");
    assert_eq!(v["peer_ips"]["127.0.0.1"], 1);
    let (v, ok) = call_json(&[&url]);
    assert!(ok);
    assert_eq!(v["body"]["protocol"], "HTTP/1.1");
}

#[test]
fn status_is_overridden_by_path_or_header_and_fails_the_call() {
    let srv = serve("web-status", &[], &[]);
    assert_eq!(http1(srv.http, "/status/503", &[]).0, 503);
    let (status, v) = http1(srv.http, "/", &[("x-testapp-status", "418")]);
    assert_eq!((status, v["pod"].as_str()), (418, Some("web-status")));
    assert_eq!(http1(srv.http, "/status/nope", &[]).0, 400);

    let url = format!("http://127.0.0.1:{}/status/503", srv.http);
    let (v, ok) = call_json(&[&url, "-n", "3"]);
    assert!(!ok, "non-2xx must fail the call");
    assert_eq!(
        (v["codes"]["503"].as_u64(), v["failed"].as_u64()),
        (Some(3), Some(3))
    );
    assert!(call(&[&url, "--allow-failures"]).status.success());
}

#[test]
fn grpc_unary_call_is_answered_with_framing_and_status() {
    let srv = serve("grpc-0", &[], &[]);
    let url = format!("grpc://127.0.0.1:{}", srv.http);
    let (v, ok) = call_json(&[&url, "-d", "ping"]);
    assert!(ok, "{v}");
    assert_eq!(v["codes"]["grpc-0"], 1);
    let body = &v["body"];
    assert_eq!(body["pod"], "grpc-0");
    assert_eq!(body["path"], "/testapp.Echo/Echo");
    assert_eq!(body["protocol"], "HTTP/2.0");
    assert_eq!(body["message"], "ping");

    let (v, ok) = call_json(&[&url, "-H", "x-testapp-grpc-status: 14"]);
    assert!(!ok);
    assert_eq!(v["codes"]["grpc-14"], 1);
}

#[test]
fn tcp_echo_sends_banner_with_peer_then_echoes() {
    let tcp = free_port();
    let srv = serve(
        "tcp-0",
        &["--tcp-port", &tcp.to_string(), "--tcp-banner"],
        &[tcp],
    );
    let s = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = s.local_addr().unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut banner = String::new();
    r.read_line(&mut banner).unwrap();
    assert_eq!(banner, format!("tcp-0 v1 {me}\n"));
    (&s).write_all(b"some bytes\n").unwrap();
    let mut echo = String::new();
    r.read_line(&mut echo).unwrap();
    assert_eq!(echo, "some bytes\n");

    let (v, ok) = call_json(&[&format!("tcp://127.0.0.1:{tcp}"), "-n", "4", "-c", "2"]);
    assert!(ok, "{v}");
    assert_eq!(
        (v["codes"]["ok"].as_u64(), v["pods"]["tcp-0"].as_u64()),
        (Some(4), Some(4))
    );
    drop(srv);
}

#[test]
fn upstream_answers_are_embedded_with_trace_headers_propagated() {
    let leaf = serve("details-0", &[], &[]);
    let up = format!("http://127.0.0.1:{}/details", leaf.http);
    let front = serve("productpage-0", &["--upstream", &up], &[]);
    let (status, v) = http1(
        front.http,
        "/",
        &[("x-request-id", "trace-7"), ("traceparent", "00-aa-bb-01")],
    );
    assert_eq!(status, 200);
    assert_eq!(v["pod"], "productpage-0");
    let u = &v["upstream"][0];
    assert_eq!(
        (u["url"].as_str(), u["ok"].as_bool(), u["code"].as_str()),
        (Some(up.as_str()), Some(true), Some("200"))
    );
    assert_eq!(u["body"]["pod"], "details-0");
    assert_eq!(u["body"]["path"], "/details");
    assert_eq!(u["body"]["headers"]["x-request-id"], "trace-7");
    assert_eq!(u["body"]["headers"]["traceparent"], "00-aa-bb-01");
    assert_eq!(u["body"]["headers"]["x-testapp-hops"], "1");
}

#[test]
fn failing_upstream_is_reported_not_fatal() {
    let dead = free_port();
    let up = format!("http://127.0.0.1:{dead}/");
    let srv = serve(
        "front-0",
        &["--upstream", &up, "--upstream-timeout", "1s"],
        &[],
    );
    let (status, v) = http1(srv.http, "/", &[]);
    assert_eq!(status, 200);
    let u = &v["upstream"][0];
    assert_eq!(u["ok"], false);
    assert!(u["error"].as_str().unwrap().starts_with("connect:"), "{u}");
    // The server is still healthy afterwards.
    assert_eq!(http1(srv.http, "/", &[]).0, 200);

    let strict = serve(
        "front-1",
        &["--upstream", &up, "--fail-on-upstream-error"],
        &[],
    );
    assert_eq!(http1(strict.http, "/", &[]).0, 502);
}

#[test]
fn call_json_summary_counts_every_request() {
    let srv = serve("count-0", &[], &[]);
    let url = format!("http://127.0.0.1:{}/", srv.http);
    let (v, ok) = call_json(&[&url, "--count", "10", "--concurrency", "3"]);
    assert!(ok, "{v}");
    assert_eq!(v["count"], 10);
    assert_eq!(v["succeeded"], 10);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["codes"]["200"], 10);
    assert_eq!(v["pods"]["count-0"], 10);
    assert_eq!(v["versions"]["v1"], 10);
    assert!(v.get("body").is_none(), "body only with --count 1");

    let (v, _) = call_json(&[&url, "-n", "10", "-c", "2", "--reuse", "--http2"]);
    assert_eq!(v["codes"]["200"], 10);
}

#[test]
fn text_output_lists_codes_and_pods_and_errors() {
    let srv = serve("text-0", &[], &[]);
    let out = call(&[&format!("http://127.0.0.1:{}/", srv.http), "-n", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("200 x2\n") && text.contains("pod text-0 x2\n"),
        "{text}"
    );

    let out = call(&[
        &format!("http://127.0.0.1:{}/", free_port()),
        "--timeout",
        "1s",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("error connect x1"), "{text}");
}

#[test]
fn bad_input_gets_errors_and_server_keeps_serving() {
    let srv = serve("robust-0", &["--max-body", "16"], &[]);
    let mut s = TcpStream::connect(("127.0.0.1", srv.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"\x00\x01garbage that is not http\r\n\r\n");
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);

    let mut s = TcpStream::connect(("127.0.0.1", srv.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = "x".repeat(100);
    let req = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{body}"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");

    assert_eq!(http1(srv.http, "/", &[]).0, 200);
    assert_eq!(call(&["ftp://x:1/"]).status.code(), Some(2));
}

#[test]
fn sigterm_stops_server_with_exit_zero() {
    let mut srv = serve("term-0", &[], &[]);
    let pid = srv.child.id() as libc::pid_t;
    // SAFETY: signalling our own child process by pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "server ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn help_documents_every_flag() {
    let serve_help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&serve_help.stdout);
    for flag in [
        "--http-port",
        "--grpc-port",
        "--tcp-port",
        "--tcp-banner",
        "--name",
        "--version",
        "--namespace",
        "--upstream",
    ] {
        assert!(text.contains(flag), "serve --help lacks {flag}");
    }
    let call_help = Command::new(BIN).args(["call", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&call_help.stdout);
    for flag in [
        "--count",
        "--concurrency",
        "--http2",
        "--timeout",
        "--header",
        "--json",
        "--allow-failures",
    ] {
        assert!(text.contains(flag), "call --help lacks {flag}");
    }
}

#[test]
fn delay_header_slows_the_reply_past_the_client_timeout() {
    let srv = serve("slow-0", &[], &[]);
    let url = format!("http://127.0.0.1:{}/", srv.http);
    let (v, ok) = call_json(&[&url, "-H", "x-testapp-delay: 400ms", "--timeout", "100ms"]);
    assert!(!ok);
    assert_eq!(v["errors"]["timeout"], 1, "{v}");
    let (v, ok) = call_json(&[&url, "-H", "x-testapp-delay: 50ms", "--timeout", "2s"]);
    assert!(ok, "{v}");
    assert!(v["latency_ms"]["min"].as_f64().unwrap() >= 50.0, "{v}");
}

/// Pure functions of the library, exercised without processes.
mod unit {
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use clap::{CommandFactory, Parser};
    use e2e::testapp::call::Summary;
    use e2e::testapp::client::{ErrorKind, Outcome, Scheme, Target, TargetError, parse_header};
    use e2e::testapp::grpc::{self, FrameError};
    use e2e::testapp::{Cli, Command, parse_duration};
    use http::HeaderMap;

    #[test]
    fn grpc_encode_then_decode_round_trips_one_message() {
        let framed = grpc::encode(b"hello").unwrap();
        assert_eq!(&framed[..grpc::PREFIX_LEN], &[0, 0, 0, 0, 5]);
        assert_eq!(
            grpc::decode_unary(framed).unwrap(),
            Bytes::from_static(b"hello")
        );
        assert_eq!(
            grpc::decode_unary(grpc::encode(b"").unwrap()).unwrap(),
            Bytes::new()
        );
    }

    #[test]
    fn grpc_decode_rejects_truncated_compressed_and_multi_message_bodies() {
        let d = |b: &'static [u8]| grpc::decode_all(Bytes::from_static(b));
        assert_eq!(d(&[0, 0, 0]), Err(FrameError::Truncated));
        assert_eq!(d(&[0, 0, 0, 0, 9, 1]), Err(FrameError::Truncated));
        assert_eq!(d(&[1, 0, 0, 0, 0]), Err(FrameError::Compressed));
        let mut two = BytesMut::new();
        two.extend_from_slice(&grpc::encode(b"a").unwrap());
        two.extend_from_slice(&grpc::encode(b"b").unwrap());
        assert_eq!(
            grpc::decode_unary(two.freeze()),
            Err(FrameError::MessageCount(2))
        );
        assert_eq!(
            grpc::decode_unary(Bytes::new()),
            Err(FrameError::MessageCount(0))
        );
    }

    #[test]
    fn grpc_status_prefers_trailers_over_headers() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().unwrap());
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(grpc::status_of(&h, Some(&t)), Some(0));
        assert_eq!(grpc::status_of(&h, None), Some(14));
        assert_eq!(grpc::status_of(&HeaderMap::new(), None), None);
    }

    #[test]
    fn targets_parse_with_default_ports_and_paths() {
        let t = Target::parse("http://details:9080/x?y=1").unwrap();
        assert_eq!(
            (t.scheme, t.authority.as_str(), t.path.as_str()),
            (Scheme::Http, "details:9080", "/x?y=1")
        );
        let t = Target::parse("http://details").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("details:80", "/"));
        assert_eq!(
            Target::parse("grpc://1.2.3.4:7070").unwrap().path,
            grpc::ECHO_PATH
        );
        assert_eq!(
            Target::parse("tcp://[::1]:9000").unwrap().authority,
            "[::1]:9000"
        );
        assert!(matches!(
            Target::parse("https://a:1/"),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::parse("tcp://a"),
            Err(TargetError::NoPort(_))
        ));
        assert!(matches!(
            Target::parse("no scheme"),
            Err(TargetError::Invalid(..))
        ));
        assert!(Target::parse("/just/a/path").is_err());
    }

    #[test]
    fn header_flags_are_trimmed_and_validated() {
        let (k, v) = parse_header("X-Request-Id: abc").unwrap();
        assert_eq!((k.as_str(), v.to_str().unwrap()), ("x-request-id", "abc"));
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("bad name: v").is_err());
    }

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn serve_defaults_to_port_8080_and_merges_grpc_ports() {
        Cli::command().debug_assert();
        let Command::Serve(a) = Cli::try_parse_from(["t", "serve", "--name", "p"])
            .unwrap()
            .command
        else {
            panic!("not serve")
        };
        assert_eq!(a.into_config().http_ports, vec![8080]);
        let args = [
            "t",
            "serve",
            "--name",
            "p",
            "--http-port",
            "1,2",
            "--grpc-port",
            "2,3",
            "--tcp-port",
            "4",
        ];
        let Command::Serve(a) = Cli::try_parse_from(args).unwrap().command else {
            panic!("not serve")
        };
        let cfg = a.into_config();
        assert_eq!((cfg.http_ports, cfg.tcp_ports), (vec![1, 2, 3], vec![4]));
        assert_eq!(cfg.identity.pod, "p");
    }

    fn outcome(code: Option<&str>, ok: bool, pod: Option<&str>, peer: &str) -> Outcome {
        Outcome {
            code: code.map(str::to_string),
            success: ok,
            body: Bytes::new(),
            pod: pod.map(str::to_string),
            version: Some("v1".into()),
            peer: Some(peer.into()),
            error: (!ok && code.is_none()).then(|| (ErrorKind::Timeout, "slow".to_string())),
            latency: Duration::from_millis(1),
        }
    }

    #[test]
    fn summary_counts_codes_pods_peers_and_errors() {
        let mut s = Summary {
            count: 3,
            ..Summary::default()
        };
        s.record(&outcome(Some("200"), true, Some("a"), "127.0.0.1:4000"));
        s.record(&outcome(Some("503"), false, Some("b"), "[fd00::1]:80"));
        s.record(&outcome(None, false, None, "garbage"));
        assert_eq!((s.succeeded, s.failed), (1, 2));
        assert_eq!(s.codes.get("200"), Some(&1));
        assert_eq!(s.pods.get("b"), Some(&1));
        assert_eq!(s.errors.get("timeout"), Some(&1));
        assert_eq!(s.peer_ips.get("127.0.0.1"), Some(&1));
        assert_eq!(s.peer_ips.get("fd00::1"), Some(&1));
        assert!(!s.all_ok());
        let text = s.text();
        assert!(
            text.contains("200 x1\n") && text.contains("pod a x1\n"),
            "{text}"
        );
        assert!(text.contains("error timeout x1 (slow)\n"), "{text}");
    }
}
