//! An in-process stand-in for the Kubernetes API server with list/watch semantics: resource
//! versions, watch from a version, 410 Gone for versions compacted away, and the ability to cut
//! every watch (to test reconnects). Single objects can be read, created (409 when they exist),
//! replaced (409 on a stale resourceVersion) and deleted; TokenReviews are answered from tokens
//! registered with `add_token`, and failures can be injected per method and path. Lists and
//! watches honour `fieldSelector` equality terms (`spec.nodeName=X`, `metadata.name!=Y`, ...);
//! an object that starts or stops matching is not turned into ADDED/DELETED as the real server
//! does. There is no real API server on these machines.

// Each test binary uses a different part of the stand-in.
#![allow(dead_code)]

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
    /// token -> (audiences it is valid for, `status.user` of its review).
    tokens: HashMap<String, (Vec<String>, Value)>,
    /// The `spec` of every TokenReview received.
    token_reviews: Vec<Value>,
    /// (method, path) of every request received.
    requests: Vec<(String, String)>,
    /// (method, path) -> HTTP status answered instead of serving, and how many more times
    /// (`None`: until cleared).
    failures: HashMap<(String, String), (u16, Option<usize>)>,
}

/// What a request path addresses.
enum Target {
    /// A collection (`path` as `collection_path` builds it), optionally one namespace of it.
    Collection { path: String, ns: Option<String> },
    /// One object of a collection, by `ns/name` (`/name` when cluster-scoped).
    Object { path: String, key: String },
}

/// Splits `/api/v1/namespaces/ns/pods/name` and friends into collection and object.
fn route(path: &str) -> Option<Target> {
    let (prefix, rest) = if let Some(r) = path.strip_prefix("/api/") {
        let (version, rest) = r.split_once('/').unwrap_or((r, ""));
        (format!("/api/{version}"), rest)
    } else {
        let r = path.strip_prefix("/apis/")?;
        let mut parts = r.splitn(3, '/');
        let (group, version) = (parts.next()?, parts.next()?);
        (
            format!("/apis/{group}/{version}"),
            parts.next().unwrap_or(""),
        )
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    Some(match segs.as_slice() {
        [plural] => Target::Collection {
            path: format!("{prefix}/{plural}"),
            ns: None,
        },
        [plural, name] => Target::Object {
            path: format!("{prefix}/{plural}"),
            key: format!("/{name}"),
        },
        ["namespaces", ns, plural] => Target::Collection {
            path: format!("{prefix}/{plural}"),
            ns: Some(ns.to_string()),
        },
        ["namespaces", ns, plural, name] => Target::Object {
            path: format!("{prefix}/{plural}"),
            key: format!("{ns}/{name}"),
        },
        _ => return None,
    })
}

/// Decodes a query component: `%XX` escapes and `+` for space (kube escapes `=` in selectors).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `fieldSelector`: every term must hold. Each term is (dotted field path, value, equal).
#[derive(Clone, Default)]
struct FieldSelector(Vec<(Vec<String>, String, bool)>);

impl FieldSelector {
    /// Parses `a.b=v,c.d!=w` (`==` is the same as `=`); an empty selector matches everything.
    fn parse(raw: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in raw.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let path = field.trim().split('.').map(str::to_string).collect();
            terms.push((path, value.trim().to_string(), equal));
        }
        Ok(Self(terms))
    }

    /// True if `o` satisfies every term; an absent field compares as the empty string.
    fn matches(&self, o: &Value) -> bool {
        self.0.iter().all(|(path, want, equal)| {
            let field = path.iter().fold(o, |v, seg| &v[seg.as_str()]);
            let got = match field {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (got == *want) == *equal
        })
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()}),
    )
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
                tokens: HashMap::new(),
                token_reviews: Vec::new(),
                requests: Vec::new(),
                failures: HashMap::new(),
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
                        async move { Ok::<_, Infallible>(s3.handle(req).await) }
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
        self.store(&mut st, path, key, &mut object)
    }

    /// Stores `object` under `key`, stamping a new resourceVersion, and tells watchers.
    fn store(&self, st: &mut State, path: String, key: String, object: &mut Value) -> u64 {
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
        let _ = self.events.send((path, rv, kind, object.clone()));
        rv
    }

    /// The stored object, if any (`ns` empty for cluster-scoped kinds).
    pub fn get(&self, api_version: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let path = collection_path(api_version, plural);
        let st = self.state.lock().unwrap();
        st.collections
            .get(&path)
            .and_then(|c| c.objects.get(&format!("{ns}/{name}")))
            .cloned()
    }

    /// Makes `token` pass TokenReviews asking for one of `audiences`, with `user` as
    /// `status.user` (`{"username": ..., "extra": {...}}`).
    pub fn add_token(&self, token: &str, audiences: &[&str], user: Value) {
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        let mut st = self.state.lock().unwrap();
        st.tokens.insert(token.to_string(), (audiences, user));
    }

    /// The `spec` of every TokenReview received so far.
    pub fn token_reviews(&self) -> Vec<Value> {
        self.state.lock().unwrap().token_reviews.clone()
    }

    /// How many `method` requests for exactly `path` arrived.
    pub fn request_count(&self, method: &str, path: &str) -> usize {
        let st = self.state.lock().unwrap();
        st.requests
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }

    /// Answers `method` requests for exactly `path` with HTTP `code` until cleared.
    pub fn fail(&self, method: &str, path: &str, code: u16) {
        let mut st = self.state.lock().unwrap();
        st.failures
            .insert((method.to_string(), path.to_string()), (code, None));
    }

    /// Answers the next `method` request for exactly `path` with HTTP `code`, then serves again.
    pub fn fail_once(&self, method: &str, path: &str, code: u16) {
        let mut st = self.state.lock().unwrap();
        st.failures
            .insert((method.to_string(), path.to_string()), (code, Some(1)));
    }

    /// Serves every request normally again.
    pub fn clear_failures(&self) {
        self.state.lock().unwrap().failures.clear();
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

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect();
        {
            let mut st = self.state.lock().unwrap();
            st.requests.push((method.clone(), path.clone()));
            let k = (method.clone(), path.clone());
            if let Some((code, left)) = st.failures.get_mut(&k) {
                let code = *code;
                if let Some(n) = left {
                    *n -= 1;
                    if *n == 0 {
                        st.failures.remove(&k);
                    }
                }
                let reason = match code {
                    403 => "Forbidden",
                    404 => "NotFound",
                    409 => "Conflict",
                    _ => "InternalError",
                };
                let code = StatusCode::from_u16(code).unwrap();
                return status(code, reason, "injected failure");
            }
        }
        let Some(target) = route(&path) else {
            return status(StatusCode::NOT_FOUND, "NotFound", "no such path");
        };
        let body: Option<Value> = if method == "POST" || method == "PUT" {
            let Ok(bytes) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            match serde_json::from_slice(&bytes) {
                Ok(v) => Some(v),
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            }
        } else {
            None
        };
        match (method.as_str(), target, body) {
            ("GET", Target::Collection { path, ns }, _) => {
                let raw = query.get("fieldSelector").map(String::as_str).unwrap_or("");
                let fields = match FieldSelector::parse(raw) {
                    Ok(f) => f,
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
                };
                let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
                if watch {
                    let from: u64 = query
                        .get("resourceVersion")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    return self.watch(path, ns, fields, from);
                }
                self.list(&path, ns.as_deref(), &fields)
            }
            ("GET", Target::Object { path, key }, _) => {
                let st = self.state.lock().unwrap();
                match st.collections.get(&path).and_then(|c| c.objects.get(&key)) {
                    Some(o) => json_response(StatusCode::OK, o),
                    None => status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{key} not found"),
                    ),
                }
            }
            ("POST", Target::Collection { path, .. }, Some(body))
                if path.ends_with("/tokenreviews") =>
            {
                self.token_review(body)
            }
            ("POST", Target::Collection { path, ns }, Some(mut body)) => {
                let Some(name) = body["metadata"]["name"].as_str().map(str::to_string) else {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "name required");
                };
                if let Some(ns) = &ns {
                    body["metadata"]["namespace"] = json!(ns);
                }
                let key = format!("{}/{name}", ns.unwrap_or_default());
                let mut st = self.state.lock().unwrap();
                if st
                    .collections
                    .get(&path)
                    .is_some_and(|c| c.objects.contains_key(&key))
                {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{key} already exists"),
                    );
                }
                self.store(&mut st, path, key, &mut body);
                json_response(StatusCode::CREATED, &body)
            }
            ("PUT", Target::Object { path, key }, Some(mut body)) => {
                let mut st = self.state.lock().unwrap();
                let Some(current) = st.collections.get(&path).and_then(|c| c.objects.get(&key))
                else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{key} not found"),
                    );
                };
                let sent = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !sent.is_empty() && Some(sent) != current["metadata"]["resourceVersion"].as_str()
                {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified",
                    );
                }
                self.store(&mut st, path, key, &mut body);
                json_response(StatusCode::OK, &body)
            }
            ("DELETE", Target::Object { path, key }, _) => {
                let mut st = self.state.lock().unwrap();
                st.rv += 1;
                let rv = st.rv;
                let col = st.collections.entry(path.clone()).or_default();
                let Some(mut obj) = col.objects.remove(&key) else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{key} not found"),
                    );
                };
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                col.history.push((rv, "DELETED", obj.clone()));
                let _ = self.events.send((path, rv, "DELETED", obj.clone()));
                json_response(StatusCode::OK, &obj)
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported",
            ),
        }
    }

    fn list(&self, path: &str, ns: Option<&str>, fields: &FieldSelector) -> Response<Body> {
        let st = self.state.lock().unwrap();
        let items: Vec<Value> = st
            .collections
            .get(path)
            .map(|c| {
                c.objects
                    .values()
                    .filter(|o| ns.is_none() || o["metadata"]["namespace"].as_str() == ns)
                    .filter(|o| fields.matches(o))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let list = json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        json_response(StatusCode::OK, &list)
    }

    /// Answers a TokenReview from the registered tokens, as the API server would.
    fn token_review(&self, mut review: Value) -> Response<Body> {
        let spec = review["spec"].clone();
        let mut st = self.state.lock().unwrap();
        st.token_reviews.push(spec.clone());
        let token = spec["token"].as_str().unwrap_or("");
        let wanted: Vec<String> = spec["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        review["status"] = match st.tokens.get(token) {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some((auds, user)) => {
                let matched: Vec<&String> = if wanted.is_empty() {
                    auds.iter().collect()
                } else {
                    wanted.iter().filter(|w| auds.contains(w)).collect()
                };
                if matched.is_empty() {
                    json!({"authenticated": false,
                        "error": "token audiences are invalid for the target audiences"})
                } else {
                    json!({"authenticated": true, "user": user, "audiences": matched})
                }
            }
        };
        json_response(StatusCode::CREATED, &review)
    }

    fn watch(
        &self,
        path: String,
        ns: Option<String>,
        fields: FieldSelector,
        from: u64,
    ) -> Response<Body> {
        let selected = move |o: &Value| {
            ns.as_deref()
                .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
                && fields.matches(o)
        };
        let (backlog, compacted) = {
            let st = self.state.lock().unwrap();
            let backlog: Vec<(u64, &'static str, Value)> = st
                .collections
                .get(&path)
                .map(|c| {
                    c.history
                        .iter()
                        .filter(|(rv, _, o)| *rv > from && selected(o))
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
                let out = match ev {
                    Ok((p, rv, t, o)) if p == path && rv > from && selected(&o) => {
                        Some(line(t, &o))
                    }
                    _ => None,
                };
                async move { out }
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
