//! `mesh-testapp`: the mesh's test/demo workload. `serve` answers HTTP/1.1, h2c, gRPC (hand
//! framed) and raw TCP echo, describing each request as JSON and optionally calling upstreams;
//! `call` sends requests and summarizes which pod/version answered with which status.

pub mod call;
pub mod client;
pub mod grpc;
pub mod handler;
pub mod serve;

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::Method;

use client::{RequestSpec, Target};
use serve::{ServeConfig, Server};

/// Who a server says it is, in every reply and banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Pod name.
    pub pod: String,
    /// Namespace (may be empty).
    pub namespace: String,
    /// Version label, e.g. `v1`.
    pub version: String,
}

/// Command line of `mesh-testapp`.
#[derive(Debug, Parser)]
#[command(
    name = "mesh-testapp",
    about = "Service-mesh test workload: an HTTP/h2c/gRPC/TCP-echo server that reports who \
             answered and what it saw, and a client that summarizes responses."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP/1.1 + h2c + gRPC on HTTP ports and TCP echo on TCP ports until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Send requests to a URL and print the distribution of answers.
    Call(CallArgs),
}

/// Flags of `serve`.
#[derive(Debug, Args)]
#[command(
    after_help = "Every HTTP reply is JSON: pod, namespace, version, peer (ip:port the \
    server saw), local, method, path, protocol (HTTP/1.1 or HTTP/2.0), headers, body_len, \
    upstream. gRPC requests (content-type application/grpc, any method path, e.g. \
    /testapp.Echo/Echo) get the same JSON as their one message and grpc-status in trailers.\n\
    Per-request knobs: path /status/NNN or header x-testapp-status: NNN sets the status; \
    x-testapp-grpc-status: N sets grpc-status; x-testapp-delay: 300ms delays the reply. \
    x-request-id, traceparent, tracestate and b3 headers are copied to upstream calls."
)]
pub struct ServeArgs {
    /// Port answering HTTP/1.1 and HTTP/2 cleartext (prior knowledge) and gRPC; repeatable or
    /// comma separated. Defaults to 8080 when no port flag is given at all.
    #[arg(long = "http-port", value_delimiter = ',')]
    pub http_ports: Vec<u16>,
    /// Port for gRPC; the same server as --http-port (requests with content-type
    /// application/grpc get gRPC framing), so this is only another HTTP port.
    #[arg(long = "grpc-port", value_delimiter = ',')]
    pub grpc_ports: Vec<u16>,
    /// Port echoing raw TCP bytes back; repeatable or comma separated.
    #[arg(long = "tcp-port", value_delimiter = ',')]
    pub tcp_ports: Vec<u16>,
    /// On each TCP connection first write one line `<pod> <version> <peer-ip:port>`.
    #[arg(long)]
    pub tcp_banner: bool,
    /// Address to bind every listener on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Pod name reported in replies [default: $POD_NAME, else the hostname].
    #[arg(long, env = "POD_NAME")]
    pub name: Option<String>,
    /// Version reported in replies.
    #[arg(
        long = "version",
        id = "app_version",
        value_name = "VERSION",
        env = "VERSION",
        default_value = "v1"
    )]
    pub version: String,
    /// Namespace reported in replies.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub namespace: String,
    /// URL (http://, grpc://, tcp://) to call on every HTTP/gRPC request; the answers are
    /// embedded under "upstream". Repeatable.
    #[arg(long = "upstream")]
    pub upstreams: Vec<String>,
    /// Deadline for each upstream call (e.g. 500ms, 2s).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Call http:// upstreams with HTTP/2 (h2c prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    pub upstream_http2: bool,
    /// Reply 502 when any upstream failed (default: report it and keep the status).
    #[arg(long)]
    pub fail_on_upstream_error: bool,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// On SIGTERM/SIGINT, how long in-flight HTTP requests may finish.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Flags of `call`.
#[derive(Debug, Args)]
#[command(
    after_help = "Per-request test knobs understood by `serve`: path /status/NNN or header \
    x-testapp-status: NNN sets the reply status; x-testapp-grpc-status: N sets grpc-status; \
    x-testapp-delay: 300ms delays the reply."
)]
pub struct CallArgs {
    /// Target: http://host[:port]/path, grpc://host:port[/pkg.Service/Method] (unary call,
    /// default /testapp.Echo/Echo) or tcp://host:port (send a line, read banner and echo).
    pub url: String,
    /// Number of requests.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub count: u64,
    /// Requests in flight at once.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub concurrency: usize,
    /// Use HTTP/2 cleartext (prior knowledge) for http:// URLs.
    #[arg(long)]
    pub http2: bool,
    /// Deadline per request, connect included (e.g. 500ms, 2s).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Extra request header `Name: value`; repeatable.
    #[arg(short = 'H', long = "header", value_parser = parse_header_flag)]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// HTTP method for http:// URLs (gRPC always uses POST).
    #[arg(short = 'X', long, default_value = "GET")]
    pub method: String,
    /// Request body (http), message (grpc, default "{}") or line (tcp, default "hello"; empty
    /// means just read one banner line).
    #[arg(short = 'd', long)]
    pub data: Option<String>,
    /// Keep one connection per worker instead of a new connection per request.
    #[arg(long)]
    pub reuse: bool,
    /// Print one JSON summary object instead of text lines.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 even if some requests failed.
    #[arg(long)]
    pub allow_failures: bool,
}

/// Parses durations like `300ms`, `2s`, `1m`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_header_flag(s: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    client::parse_header(s)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

impl ServeArgs {
    /// Turns flags into a [`ServeConfig`].
    pub fn into_config(self) -> ServeConfig {
        let mut http_ports = self.http_ports;
        http_ports.extend(self.grpc_ports);
        if http_ports.is_empty() && self.tcp_ports.is_empty() {
            http_ports.push(8080);
        }
        // The same port given twice (e.g. --http-port and --grpc-port) is one listener.
        let mut seen = std::collections::HashSet::new();
        http_ports.retain(|p| seen.insert(*p));
        ServeConfig {
            identity: Identity {
                pod: self.name.filter(|n| !n.is_empty()).unwrap_or_else(hostname),
                namespace: self.namespace,
                version: self.version,
            },
            bind: self.bind,
            http_ports,
            tcp_ports: self.tcp_ports,
            tcp_banner: self.tcp_banner,
            upstreams: self.upstreams,
            upstream_timeout: self.upstream_timeout,
            upstream_http2: self.upstream_http2,
            fail_on_upstream_error: self.fail_on_upstream_error,
            max_body: self.max_body,
            drain_timeout: self.drain_timeout,
        }
    }
}

impl CallArgs {
    /// Turns flags into a [`call::CallConfig`].
    pub fn into_config(self) -> Result<call::CallConfig, String> {
        let target = Target::parse(&self.url).map_err(|e| e.to_string())?;
        let method =
            Method::from_bytes(self.method.as_bytes()).map_err(|e| format!("method: {e}"))?;
        let body = match (self.data, target.scheme) {
            (Some(d), _) => d,
            (None, client::Scheme::Grpc) => "{}".to_string(),
            (None, client::Scheme::Tcp) => "hello".to_string(),
            (None, client::Scheme::Http) => String::new(),
        };
        Ok(call::CallConfig {
            target,
            count: self.count,
            concurrency: self.concurrency,
            spec: RequestSpec {
                method,
                headers: self.headers,
                body: Bytes::from(body),
                http2: self.http2,
                timeout: self.timeout,
            },
            reuse: self.reuse,
        })
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let int = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term => {}
        _ = int => {}
    }
}

/// Entry point of the binary: parses `std::env::args` and runs. Exit codes: 0 success,
/// 1 failed requests or runtime error, 2 usage error.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-testapp: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cli))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => {
            let cfg = args.into_config();
            let id = cfg.identity.clone();
            let server = match Server::bind(cfg).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mesh-testapp: {e}");
                    return ExitCode::from(1);
                }
            };
            for a in server.http_addrs() {
                eprintln!(
                    "mesh-testapp: {} {} serving http/h2c/grpc on {a}",
                    id.pod, id.version
                );
            }
            for a in server.tcp_addrs() {
                eprintln!(
                    "mesh-testapp: {} {} serving tcp echo on {a}",
                    id.pod, id.version
                );
            }
            server.run(shutdown_signal()).await;
            eprintln!("mesh-testapp: stopped");
            ExitCode::SUCCESS
        }
        Command::Call(args) => {
            let json = args.json;
            let allow_failures = args.allow_failures;
            let cfg = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mesh-testapp: {e}");
                    return ExitCode::from(2);
                }
            };
            let summary = call::run(cfg).await;
            if json {
                println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            } else {
                print!("{}", summary.text());
            }
            if summary.all_ok() || allow_failures {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
