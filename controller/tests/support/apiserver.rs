//! An in-process stand-in for the Kubernetes API server with list/watch semantics: resource
//! versions, watch from a version, 410 Gone for versions compacted away, and the ability to cut
//! every watch (to test reconnects). There is no real API server on these machines.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One collection (e.g. `/api/v1/pods`).
#[derive(Default)]
struct Collection {
    /// `ns/name` -> object.
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object) for watches that resume.
    history: Vec<(u64, &'static str, Value)>,
}

struct State {
    rv: u64,
    collections: HashMap<String, Collection>,
    /// Versions at or below this were compacted: watching from them gets 410 Gone.
    compacted: u64,
}

/// The stand-in API server.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(String, u64, &'static str, Value)>,
    cut: Arc<Mutex<CancellationToken>>,
    /// `http://127.0.0.1:port`.
    pub url: String,
    stop: CancellationToken,
}

/// The list path of a kind, as kube's `Api::all` requests it.
pub fn collection_path(api_version: &str, plural: &str) -> String {
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

impl ApiServer {
    /// Starts on 127.0.0.1 (random port).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (events, _) = broadcast::channel(4096);
        let server = ApiServer {
            state: Arc::new(Mutex::new(State {
                rv: 1,
                collections: HashMap::new(),
                compacted: 0,
            })),
            events,
            cut: Arc::new(Mutex::new(CancellationToken::new())),
            url,
            stop: CancellationToken::new(),
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = s.stop.cancelled() => return,
                };
                let s2 = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s3 = s2.clone();
                        async move { Ok::<_, Infallible>(s3.handle(req)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        server
    }

    /// Stops serving.
    pub fn stop(&self) {
        self.stop.cancel();
        self.cut.lock().unwrap().cancel();
    }

    /// Creates or updates `object` (its apiVersion/kind/metadata decide where it goes).
    pub fn apply(&self, plural: &str, mut object: Value) -> u64 {
        let api_version = object["apiVersion"].as_str().unwrap_or("v1").to_string();
        let path = collection_path(&api_version, plural);
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let key = format!("{ns}/{name}");
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let col = st.collections.entry(path.clone()).or_default();
        let kind = if col.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        col.objects.insert(key, object.clone());
        col.history.push((rv, kind, object.clone()));
        let _ = self.events.send((path, rv, kind, object));
        rv
    }

    /// Deletes an object.
    pub fn delete(&self, api_version: &str, plural: &str, ns: &str, name: &str) {
        let path = collection_path(api_version, plural);
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let col = st.collections.entry(path.clone()).or_default();
        if let Some(mut obj) = col.objects.remove(&format!("{ns}/{name}")) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            col.history.push((rv, "DELETED", obj.clone()));
            let _ = self.events.send((path, rv, "DELETED", obj));
        }
    }

    /// Simulates a deletion the client misses: every watch is cut, the object removed without
    /// an event, and history compacted, so clients must relist (410 Gone) to notice.
    pub fn delete_while_disconnected(&self, api_version: &str, plural: &str, ns: &str, name: &str) {
        let path = collection_path(api_version, plural);
        let mut st = self.state.lock().unwrap();
        self.cut_watches();
        st.rv += 1;
        if let Some(c) = st.collections.get_mut(&path) {
            c.objects.remove(&format!("{ns}/{name}"));
        }
        st.compacted = st.rv;
        for c in st.collections.values_mut() {
            c.history.clear();
        }
    }

    /// Ends every open watch (clients reconnect from their last version).
    pub fn cut_watches(&self) {
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        if watch {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return self.watch(path, from);
        }
        let st = self.state.lock().unwrap();
        let items: Vec<Value> = st
            .collections
            .get(&path)
            .map(|c| c.objects.values().cloned().collect())
            .unwrap_or_default();
        let list = json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        json_response(StatusCode::OK, &list)
    }

    fn watch(&self, path: String, from: u64) -> Response<Body> {
        let (backlog, compacted) = {
            let st = self.state.lock().unwrap();
            let backlog: Vec<(u64, &'static str, Value)> = st
                .collections
                .get(&path)
                .map(|c| {
                    c.history
                        .iter()
                        .filter(|(rv, _, _)| *rv > from)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            (backlog, from != 0 && from < st.compacted)
        };
        let line = |t: &str, o: &Value| {
            let mut s = serde_json::to_vec(&json!({"type": t, "object": o})).unwrap();
            s.push(b'\n');
            Ok::<_, Infallible>(Frame::data(Bytes::from(s)))
        };
        if compacted {
            let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "code": 410, "reason": "Expired", "message": "too old resource version"});
            let body = futures::stream::iter(vec![line("ERROR", &gone)]);
            return stream_response(BodyExt::boxed(StreamBody::new(body)));
        }
        let rx = self.events.subscribe();
        let cut = self.cut.lock().unwrap().clone();
        let first = futures::stream::iter(
            backlog
                .into_iter()
                .map(move |(_, t, o)| line(t, &o))
                .collect::<Vec<_>>(),
        );
        let live = tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(move |ev| {
                let path = path.clone();
                async move {
                    match ev {
                        Ok((p, rv, t, o)) if p == path && rv > from => Some(line(t, &o)),
                        _ => None,
                    }
                }
            })
            .take_until(async move { cut.cancelled().await });
        stream_response(BodyExt::boxed(StreamBody::new(first.chain(live))))
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed())
        .unwrap()
}

fn stream_response(body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}
