//! Per-connection access log: one structured `tracing` event (target `access`) per connection.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Tracing target of access-log events, so filters can route or silence them.
pub const TARGET: &str = "access";

/// Which way the connection went through this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Arrived for a local workload (HBONE or plaintext inbound).
    Inbound,
    /// Left a local workload towards the mesh.
    Outbound,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

/// Everything logged about one finished (or failed) connection; `None` fields are omitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLog {
    /// Client address as seen by this proxy.
    pub src_addr: SocketAddr,
    /// Client workload name.
    pub src_workload: Option<String>,
    /// Client namespace.
    pub src_namespace: Option<String>,
    /// Client SPIFFE identity.
    pub src_identity: Option<String>,
    /// Final destination address (workload IP:port).
    pub dst_addr: SocketAddr,
    /// HBONE tunnel endpoint (IP:15008) when the connection was tunnelled.
    pub dst_hbone_addr: Option<SocketAddr>,
    /// Destination service hostname.
    pub dst_service: Option<String>,
    /// Destination workload name.
    pub dst_workload: Option<String>,
    /// Destination namespace.
    pub dst_namespace: Option<String>,
    /// Destination SPIFFE identity.
    pub dst_identity: Option<String>,
    /// Inbound or outbound.
    pub direction: Direction,
    /// Bytes sent to the client.
    pub bytes_sent: u64,
    /// Bytes received from the client.
    pub bytes_recv: u64,
    /// Connection lifetime.
    pub duration: Duration,
    /// Why the connection failed, if it did.
    pub error: Option<String>,
}

impl ConnectionLog {
    /// A log entry with only the mandatory fields set.
    pub fn new(direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self {
            src_addr,
            src_workload: None,
            src_namespace: None,
            src_identity: None,
            dst_addr,
            dst_hbone_addr: None,
            dst_service: None,
            dst_workload: None,
            dst_namespace: None,
            dst_identity: None,
            direction,
            bytes_sent: 0,
            bytes_recv: 0,
            duration: Duration::ZERO,
            error: None,
        }
    }

    /// Emits the entry as one `info` event with target `access` and dotted field names.
    pub fn emit(&self) {
        let message = if self.error.is_some() {
            "connection failed"
        } else {
            "connection complete"
        };
        // Braced fields: dotted names directly in `info!` are ambiguous to the macro parser.
        tracing::event!(
            target: "access",
            tracing::Level::INFO,
            {
            src.addr = %self.src_addr,
            src.workload = self.src_workload.as_deref(),
            src.namespace = self.src_namespace.as_deref(),
            src.identity = self.src_identity.as_deref(),
            dst.addr = %self.dst_addr,
            dst.hbone_addr = self.dst_hbone_addr.map(tracing::field::display),
            dst.service = self.dst_service.as_deref(),
            dst.workload = self.dst_workload.as_deref(),
            dst.namespace = self.dst_namespace.as_deref(),
            dst.identity = self.dst_identity.as_deref(),
            direction = %self.direction,
            bytes_sent = self.bytes_sent,
            bytes_recv = self.bytes_recv,
            duration = %format_args!("{}ms", self.duration.as_millis()),
            error = self.error.as_deref(),
            },
            "{message}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` under a JSON subscriber and returns the emitted lines, parsed.
    fn capture(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn emit_writes_one_json_object_with_dotted_fields() {
        let mut log = ConnectionLog::new(
            Direction::Inbound,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        log.src_workload = Some("sleep".into());
        log.src_namespace = Some("default".into());
        log.src_identity = Some("spiffe://cluster.local/ns/default/sa/sleep".into());
        log.dst_hbone_addr = Some("10.0.0.2:15008".parse().unwrap());
        log.dst_service = Some("httpbin.default.svc.cluster.local".into());
        log.dst_workload = Some("httpbin".into());
        log.dst_namespace = Some("default".into());
        log.dst_identity = Some("spiffe://cluster.local/ns/default/sa/httpbin".into());
        log.bytes_sent = 120;
        log.bytes_recv = 80;
        log.duration = Duration::from_millis(42);
        let lines = capture(|| log.emit());
        assert_eq!(lines.len(), 1);
        let v = &lines[0];
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "connection complete");
        assert_eq!(v["src.addr"], "10.0.0.1:40000");
        assert_eq!(v["src.workload"], "sleep");
        assert_eq!(v["src.namespace"], "default");
        assert_eq!(
            v["src.identity"],
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(v["dst.addr"], "10.0.0.2:8080");
        assert_eq!(v["dst.hbone_addr"], "10.0.0.2:15008");
        assert_eq!(v["dst.service"], "httpbin.default.svc.cluster.local");
        assert_eq!(v["dst.workload"], "httpbin");
        assert_eq!(v["dst.namespace"], "default");
        assert_eq!(
            v["dst.identity"],
            "spiffe://cluster.local/ns/default/sa/httpbin"
        );
        assert_eq!(v["direction"], "inbound");
        assert_eq!(v["bytes_sent"], 120);
        assert_eq!(v["bytes_recv"], 80);
        assert_eq!(v["duration"], "42ms");
        assert!(v.get("error").is_none());
    }

    #[test]
    fn emit_omits_unknown_fields_and_reports_error() {
        let mut log = ConnectionLog::new(
            Direction::Outbound,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.9:80".parse().unwrap(),
        );
        log.error = Some("connection refused".into());
        let lines = capture(|| log.emit());
        assert_eq!(lines.len(), 1);
        let v = &lines[0];
        assert_eq!(v["message"], "connection failed");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["error"], "connection refused");
        assert!(v.get("src.workload").is_none());
        assert!(v.get("dst.hbone_addr").is_none());
    }
}
