//! Protocol details checked on a raw gRPC stream: nonces, debounce, slow proxies, auth,
//! shutdown and explicit subscriptions.

use super::*;

/// A gRPC stream driven request by request.
struct Raw {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Raw {
    async fn open(addr: SocketAddr, token: Option<&str>) -> Result<Raw, tonic::Status> {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let rx = client.delta_aggregated_resources(req).await?.into_inner();
        Ok(Raw { tx, rx })
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn subscribe_wildcard(&self, type_url: &str) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "raw".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.next())
            .await
            .expect("response within 5s")
            .expect("stream open")
            .expect("no error")
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(d, self.rx.next()).await {
            panic!("unexpected response {r:?}");
        }
    }

    async fn ack(&self, type_url: &str, nonce: &str, error: Option<&str>) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| xds::google::rpc::Status {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> BTreeSet<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn nonces_are_unique_and_stale_or_repeated_nonces_are_ignored() {
    let s = start(fast(), None).await;
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("a", "1")], vec![]);
    let mut raw = Raw::open(s.addr, None).await.unwrap();
    raw.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    let first = raw.next().await;
    assert_eq!(names(&first), BTreeSet::from(["a"]));

    raw.ack(AUTHORIZATION_TYPE, "not-a-nonce-we-sent", Some("nope"))
        .await;
    raw.ack(AUTHORIZATION_TYPE, &first.nonce, Some("a is bad"))
        .await;
    raw.ack(AUTHORIZATION_TYPE, &first.nonce, Some("again"))
        .await;
    eventually("one NACK", || nacks(&s.metrics, AUTHORIZATION_TYPE) == 1).await;
    // Nothing is resent after a NACK.
    raw.nothing_for(Duration::from_millis(100)).await;
    assert_eq!(nacks(&s.metrics, AUTHORIZATION_TYPE), 1);

    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("b", "1")], vec![]);
    let second = raw.next().await;
    assert_eq!(names(&second), BTreeSet::from(["b"]));
    assert_ne!(second.nonce, first.nonce);
    raw.ack(AUTHORIZATION_TYPE, &second.nonce, None).await;
    eventually("ACK", || acks(&s.xds) == 1).await;
}

#[tokio::test]
async fn bursts_are_debounced_into_one_push() {
    let config = XdsConfig {
        debounce: Duration::from_millis(50),
        max_debounce: Duration::from_secs(1),
        ..XdsConfig::default()
    };
    let s = start(config, None).await;
    let mut raw = Raw::open(s.addr, None).await.unwrap();
    raw.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    assert!(raw.next().await.resources.is_empty());
    for i in 0..20 {
        s.xds.update(
            AUTHORIZATION_TYPE,
            vec![policy(&format!("p{i}"), "1")],
            vec![],
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(raw.next().await.resources.len(), 20);
    raw.nothing_for(Duration::from_millis(150)).await;
    assert!(
        s.metrics
            .push_latency
            .with_label_values(&["Authorization"])
            .get_sample_count()
            >= 1
    );
}

#[tokio::test]
async fn slow_proxy_does_not_delay_others_and_gets_coalesced_state() {
    let config = XdsConfig {
        debounce: Duration::from_millis(2),
        max_debounce: Duration::from_millis(10),
        queue_depth: 1,
        ..XdsConfig::default()
    };
    let s = start(config, None).await;
    let mut slow = Raw::open(s.addr, None).await.unwrap();
    slow.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    let mut fast = Raw::open(s.addr, None).await.unwrap();
    fast.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    fast.next().await;

    let big = "x".repeat(256 * 1024);
    let rounds = 40;
    for round in 0..rounds {
        let batch = (0..4)
            .map(|i| policy(&format!("p{i}"), &format!("{round}{big}")))
            .collect();
        s.xds.update(AUTHORIZATION_TYPE, batch, vec![]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let latest = s.xds.versions(AUTHORIZATION_TYPE);
    // The reading proxy reaches the final state while the other one reads nothing.
    let mut fast_state = std::collections::BTreeMap::new();
    while fast_state != latest {
        for r in fast.next().await.resources {
            fast_state.insert(r.name, r.version);
        }
    }

    let mut slow_state = std::collections::BTreeMap::new();
    let mut slow_resources = 0;
    while slow_state != latest {
        let r = slow.next().await;
        slow_resources += r.resources.len();
        for r in r.resources {
            slow_state.insert(r.name, r.version);
        }
    }
    assert!(
        slow_resources < 4 * rounds,
        "slow proxy got {slow_resources} resources; pushes were not coalesced"
    );
}

#[tokio::test]
async fn authenticator_refuses_streams_without_a_valid_token() {
    let auth = |m: &MetadataMap| -> Result<Caller, tonic::Status> {
        match bearer_token(m)? {
            "good" => Ok(Caller {
                identity: None,
                node: Some("node1".into()),
            }),
            _ => Err(tonic::Status::unauthenticated("bad token")),
        }
    };
    let s = start(fast(), Some(Arc::new(auth))).await;
    for token in [None, Some("bad")] {
        let err = Raw::open(s.addr, token).await.err().expect("refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    let mut raw = Raw::open(s.addr, Some("good")).await.unwrap();
    raw.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    raw.next().await;
    assert_eq!(s.xds.connections()[0].caller_node.as_deref(), Some("node1"));
}

#[tokio::test]
async fn shutdown_closes_streams() {
    let s = start(fast(), None).await;
    let mut raw = Raw::open(s.addr, None).await.unwrap();
    raw.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    raw.next().await;
    s.stop.cancel();
    let end = tokio::time::timeout(WAIT, raw.rx.next())
        .await
        .expect("stream ends");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    eventually("gauge back to zero", || s.metrics.connected.get() == 0).await;
}

#[tokio::test]
async fn explicit_subscriptions_follow_subscribe_unsubscribe_and_wildcard_marker() {
    let s = start(fast(), None).await;
    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("a", "1"), policy("b", "1")],
        vec![],
    );
    let mut raw = Raw::open(s.addr, None).await.unwrap();
    let subscribe = |names: &[&str], unsub: &[&str]| DeltaDiscoveryRequest {
        type_url: AUTHORIZATION_TYPE.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    raw.send(subscribe(&["a"], &[])).await;
    assert_eq!(names(&raw.next().await), BTreeSet::from(["a"]));
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("b", "2")], vec![]);
    raw.nothing_for(Duration::from_millis(100)).await;

    raw.send(subscribe(&[], &["a"])).await;
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("a", "2")], vec![]);
    raw.nothing_for(Duration::from_millis(100)).await;
    // Subscribing again sends the current version although nothing changed since.
    raw.send(subscribe(&["a"], &[])).await;
    let again = raw.next().await;
    assert_eq!(names(&again), BTreeSet::from(["a"]));

    // "*" turns the stream into a wildcard one: it receives what it lacks.
    raw.send(subscribe(&["*"], &[])).await;
    assert_eq!(names(&raw.next().await), BTreeSet::from(["b"]));

    // A first request with "*" and names is a wildcard stream too.
    let mut both = Raw::open(s.addr, None).await.unwrap();
    both.send(subscribe(&["*", "a"], &[])).await;
    assert_eq!(names(&both.next().await), BTreeSet::from(["a", "b"]));
}

#[tokio::test]
async fn large_sync_goes_out_in_bounded_chunks_and_later_changes_follow_it() {
    let s = start(fast(), None).await;
    let all: Vec<_> = (0..250).map(|i| policy(&format!("p{i:03}"), "1")).collect();
    s.xds.update(AUTHORIZATION_TYPE, all, vec![]);
    let mut raw = Raw::open(s.addr, None).await.unwrap();
    raw.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    let mut got = BTreeSet::new();
    let mut sizes = Vec::new();
    // A change made while the sync is under way arrives after it, not mixed into it.
    s.xds.update(
        AUTHORIZATION_TYPE,
        vec![policy("p000", "2")],
        vec!["p249".into()],
    );
    while got.len() < 250 {
        let r = raw.next().await;
        sizes.push(r.resources.len());
        for n in names(&r) {
            assert!(got.insert(n.to_string()), "{n} sent twice in the sync");
        }
        if got.len() == 249 && !got.contains("p249") {
            // The change was folded into the sync's snapshot.
            break;
        }
    }
    assert!(sizes.iter().all(|n| *n <= 100), "chunk sizes {sizes:?}");
    assert!(sizes.len() >= 3, "chunk sizes {sizes:?}");
    if got.contains("p249") {
        let after = raw.next().await;
        assert_eq!(names(&after), BTreeSet::from(["p000"]));
        assert_eq!(after.removed_resources, vec!["p249"]);
    }
    raw.nothing_for(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn requests_breaking_stream_limits_end_that_stream_only_with_a_clear_error() {
    let s = start(fast(), None).await;
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("a", "1")], vec![]);
    let mut good = Raw::open(s.addr, None).await.unwrap();
    good.subscribe_wildcard(AUTHORIZATION_TYPE).await;
    assert_eq!(names(&good.next().await), BTreeSet::from(["a"]));

    // An oversized resource name.
    let mut bad = Raw::open(s.addr, None).await.unwrap();
    bad.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        resource_names_subscribe: vec!["x".repeat(5000)],
        ..Default::default()
    })
    .await;
    let err = tokio::time::timeout(WAIT, bad.rx.next())
        .await
        .expect("answer within 5s")
        .expect("an item")
        .expect_err("stream refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("resource name"), "{}", err.message());

    // Too many types on one stream.
    let mut greedy = Raw::open(s.addr, None).await.unwrap();
    for i in 0..17 {
        greedy
            .send(DeltaDiscoveryRequest {
                type_url: format!("type.example/t{i}"),
                ..Default::default()
            })
            .await;
    }
    let err = loop {
        match tokio::time::timeout(WAIT, greedy.rx.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => break e,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("resource types"),
        "{}",
        err.message()
    );
    assert_eq!(s.metrics.rejected.get(), 2);

    // The well-behaved stream still gets pushes.
    s.xds
        .update(AUTHORIZATION_TYPE, vec![policy("b", "1")], vec![]);
    assert_eq!(names(&good.next().await), BTreeSet::from(["b"]));
}
