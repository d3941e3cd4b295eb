//! The CA in Kubernetes mode against the in-process API server stand-in: CA material in
//! Secrets (generated once, plugged-in `cacerts` first), roots published as ConfigMaps in every
//! namespace, and callers authenticated with TokenReview.

mod support {
    pub mod apiserver;
}

use std::collections::BTreeMap;
use std::sync::Arc;

use controller::ca::kube::{
    CA_SECRET, KubeRootStore, NODE_NAME_EXTRA, PLUGGED_SECRET, POD_NAME_EXTRA, POD_UID_EXTRA,
    ROOT_CONFIGMAP, TokenReviewAuthenticator, TokenReviewConfig,
};
use controller::ca::{
    Authenticator, CaConfig, CaError, CaService, CertificateAuthority, IMPERSONATED_IDENTITY,
    NodeAuthorizer, RootStore,
};
use hbone::Identity;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use support::apiserver::ApiServer;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request};
use xds::istio::v1::auth::IstioCertificateRequest;
use xds::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;

const NAMESPACES: [&str; 3] = ["istio-system", "default", "shop"];

async fn cluster() -> (ApiServer, kube::Client) {
    let api = ApiServer::start().await;
    for ns in NAMESPACES {
        api.apply("namespaces", namespace(ns));
    }
    let client = kube::Client::try_from(kube::Config::new(api.url.parse().unwrap())).unwrap();
    (api, client)
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn config() -> CaConfig {
    CaConfig::default()
}

/// A Secret JSON in `istio-system` with `data` base64-encoded as the API server stores it.
fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    let data: BTreeMap<String, ByteString> = data
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    let mut s = Secret {
        data: Some(data),
        ..Secret::default()
    };
    s.metadata.name = Some(name.into());
    s.metadata.namespace = Some("istio-system".into());
    let mut v = serde_json::to_value(&s).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    v
}

fn published_root(api: &ApiServer, ns: &str) -> Option<String> {
    let cm = api.get("v1", "configmaps", ns, ROOT_CONFIGMAP)?;
    cm["data"]["root-cert.pem"].as_str().map(str::to_string)
}

#[tokio::test]
async fn first_start_creates_ca_secret_and_later_starts_load_it() {
    let (api, client) = cluster().await;
    let store = KubeRootStore::new(client.clone(), "istio-system");
    let first = CertificateAuthority::load_or_create(&store, config())
        .await
        .unwrap();
    let stored = api
        .get("v1", "secrets", "istio-system", CA_SECRET)
        .expect("istio-ca-secret created");
    assert_eq!(stored["type"], "istio.io/ca-root");
    assert!(stored["data"]["ca-cert.pem"].is_string(), "{stored}");
    assert!(stored["data"]["ca-key.pem"].is_string(), "{stored}");

    // Another replica (or a restart) signs with the same root instead of making a new one.
    let again =
        CertificateAuthority::load_or_create(&KubeRootStore::new(client, "istio-system"), config())
            .await
            .unwrap();
    assert_eq!(again.root_pem(), first.root_pem());
    assert_eq!(
        api.request_count("POST", "/api/v1/namespaces/istio-system/secrets"),
        1
    );
    api.stop();
}

#[tokio::test]
async fn save_never_overwrites_a_secret_another_replica_created() {
    let (api, client) = cluster().await;
    let store = KubeRootStore::new(client.clone(), "istio-system");
    let winner = CertificateAuthority::generate_root(&config()).unwrap();
    let loser = CertificateAuthority::generate_root(&config()).unwrap();
    store.save(&winner).await.unwrap();
    assert!(matches!(store.save(&loser).await, Err(CaError::Store(_))));
    assert_eq!(store.load().await.unwrap(), Some(winner));
    api.stop();
}

#[tokio::test]
async fn replicas_starting_together_agree_on_one_root() {
    let (api, client) = cluster().await;
    let a = KubeRootStore::new(client.clone(), "istio-system");
    let b = KubeRootStore::new(client, "istio-system");
    let (ca_a, ca_b) = tokio::join!(
        a.load_or_create_authority(config()),
        b.load_or_create_authority(config())
    );
    assert_eq!(ca_a.unwrap().root_pem(), ca_b.unwrap().root_pem());
    api.stop();
}

#[tokio::test]
async fn replica_losing_the_create_race_loads_the_winners_root() {
    let (api, client) = cluster().await;
    let winner = KubeRootStore::new(client.clone(), "istio-system")
        .load_or_create_authority(config())
        .await
        .unwrap();
    // The loser read before the winner's Secret existed, so its create collides.
    let secret_path = "/api/v1/namespaces/istio-system/secrets/istio-ca-secret";
    let loser = KubeRootStore::new(client, "istio-system");
    api.fail_once("GET", secret_path, 404);
    assert!(matches!(
        CertificateAuthority::load_or_create(&loser, config()).await,
        Err(CaError::Store(_))
    ));
    api.fail_once("GET", secret_path, 404);
    let ca = loser.load_or_create_authority(config()).await.unwrap();
    assert_eq!(ca.root_pem(), winner.root_pem());
    assert_eq!(
        api.request_count("POST", "/api/v1/namespaces/istio-system/secrets"),
        3
    );
    api.stop();
}

#[tokio::test]
async fn plugged_in_cacerts_take_precedence() {
    let (api, client) = cluster().await;
    let generated = CertificateAuthority::generate_root(&config()).unwrap();
    api.apply(
        "secrets",
        secret(
            CA_SECRET,
            &[
                ("ca-cert.pem", &generated.cert_pem),
                ("ca-key.pem", &generated.key_pem),
            ],
        ),
    );
    let plugged = CertificateAuthority::generate_root(&config()).unwrap();
    api.apply(
        "secrets",
        secret(
            PLUGGED_SECRET,
            &[
                ("ca-cert.pem", &plugged.cert_pem),
                ("ca-key.pem", &plugged.key_pem),
                // Istio leaves optional keys empty: they count as absent.
                ("cert-chain.pem", ""),
                ("root-cert.pem", &plugged.cert_pem),
            ],
        ),
    );
    let store = KubeRootStore::new(client.clone(), "istio-system");
    let ca = CertificateAuthority::load_or_create(&store, config())
        .await
        .unwrap();
    assert_eq!(ca.root_pem(), plugged.cert_pem);
    assert_eq!(
        published_root(&api, "shop").as_deref(),
        Some(plugged.cert_pem.as_str())
    );

    // cert-manager's tls.crt/tls.key/ca.crt layout is accepted too.
    api.apply(
        "secrets",
        secret(
            PLUGGED_SECRET,
            &[
                ("tls.crt", &plugged.cert_pem),
                ("tls.key", &plugged.key_pem),
                ("ca.crt", &plugged.cert_pem),
            ],
        ),
    );
    let ca = CertificateAuthority::load_or_create(&store, config())
        .await
        .unwrap();
    assert_eq!(ca.root_pem(), plugged.cert_pem);

    // A cacerts without its key is an error, never a silent fallback to istio-ca-secret.
    api.apply(
        "secrets",
        secret(PLUGGED_SECRET, &[("ca-cert.pem", &plugged.cert_pem)]),
    );
    assert!(matches!(
        CertificateAuthority::load_or_create(&store, config()).await,
        Err(CaError::Incomplete(_))
    ));
    assert_eq!(
        api.request_count("POST", "/api/v1/namespaces/istio-system/secrets"),
        0
    );
    api.stop();
}

#[tokio::test]
async fn roots_are_published_to_every_namespace() {
    let (api, client) = cluster().await;
    let stale = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CONFIGMAP, "namespace": "shop"},
        "data": {"root-cert.pem": "stale", "other": "kept"}});
    api.apply("configmaps", stale);
    let mut terminating = namespace("leaving");
    terminating["status"] = json!({"phase": "Terminating"});
    api.apply("namespaces", terminating);

    let store = KubeRootStore::new(client, "istio-system");
    assert!(store.publish_to_namespace("shop").await.is_err());
    let ca = CertificateAuthority::load_or_create(&store, config())
        .await
        .unwrap();
    for ns in NAMESPACES {
        assert_eq!(
            published_root(&api, ns).as_deref(),
            Some(ca.root_pem()),
            "{ns}"
        );
    }
    let shop = api.get("v1", "configmaps", "shop", ROOT_CONFIGMAP).unwrap();
    assert_eq!(shop["data"]["other"], "kept");
    assert_eq!(published_root(&api, "leaving"), None);

    // Unchanged ConfigMaps are not rewritten.
    store.publish_roots(ca.root_pem()).await.unwrap();
    assert_eq!(
        api.request_count(
            "PUT",
            "/api/v1/namespaces/default/configmaps/istio-ca-root-cert"
        ),
        0
    );

    // A namespace created later gets the bundle on request.
    api.apply("namespaces", namespace("late"));
    store.publish_to_namespace("late").await.unwrap();
    assert_eq!(published_root(&api, "late").as_deref(), Some(ca.root_pem()));
    assert_eq!(store.current_roots().as_deref(), Some(ca.root_pem()));

    // A namespace the API refuses to write makes the publication fail loudly.
    api.fail("POST", "/api/v1/namespaces/new/configmaps", 403);
    api.apply("namespaces", namespace("new"));
    match store.publish_roots(ca.root_pem()).await {
        Err(CaError::Store(m)) => assert!(m.contains("1 of"), "{m}"),
        other => panic!("{other:?}"),
    }
    api.stop();
}

fn sa_user(ns: &str, sa: &str, extra: Value) -> Value {
    json!({"username": format!("system:serviceaccount:{ns}:{sa}"), "uid": "u",
        "groups": ["system:serviceaccounts"], "extra": extra})
}

fn bearer(token: &str) -> MetadataMap {
    let mut m = MetadataMap::new();
    m.insert("authorization", format!("Bearer {token}").parse().unwrap());
    m
}

fn authenticator(client: kube::Client) -> TokenReviewAuthenticator {
    TokenReviewAuthenticator::new(client, TokenReviewConfig::default())
}

#[tokio::test]
async fn token_review_accepts_valid_tokens_and_refuses_others() {
    let (api, client) = cluster().await;
    api.add_token(
        "cart-token",
        &["istio-ca"],
        sa_user("shop", "cart", json!({})),
    );
    api.add_token(
        "api-token",
        &["https://kubernetes.default.svc"],
        sa_user("shop", "cart", json!({})),
    );
    api.add_token("user-token", &["istio-ca"], json!({"username": "alice"}));
    let auth = authenticator(client);

    let caller = auth.authenticate(&bearer("cart-token")).await.unwrap();
    assert_eq!(
        caller.identity,
        Some(Identity::new("cluster.local", "shop", "cart"))
    );
    assert_eq!(caller.node, None);
    let reviews = api.token_reviews();
    assert_eq!(reviews[0]["token"], "cart-token");
    assert_eq!(reviews[0]["audiences"], json!(["istio-ca"]));

    for token in ["forged", "api-token", "user-token"] {
        let err = auth.authenticate(&bearer(token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token}: {err:?}");
    }
    let reviews_sent = api.token_reviews().len();
    let err = auth.authenticate(&MetadataMap::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        api.token_reviews().len(),
        reviews_sent,
        "no review without a token"
    );
    api.stop();
}

#[tokio::test]
async fn successful_reviews_are_cached_and_failures_are_not() {
    let (api, client) = cluster().await;
    api.add_token(
        "cart-token",
        &["istio-ca"],
        sa_user("shop", "cart", json!({})),
    );
    let auth = authenticator(client);
    let reviews = "/apis/authentication.k8s.io/v1/tokenreviews";
    for _ in 0..3 {
        auth.authenticate(&bearer("cart-token")).await.unwrap();
        assert!(auth.authenticate(&bearer("forged")).await.is_err());
    }
    assert_eq!(api.request_count("POST", reviews), 1 + 3);

    // An API server failure is "try again", not "bad credentials", and is not remembered.
    api.fail("POST", reviews, 500);
    let err = auth.authenticate(&bearer("other")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    api.clear_failures();
    api.add_token("other", &["istio-ca"], sa_user("shop", "other", json!({})));
    assert!(auth.authenticate(&bearer("other")).await.is_ok());
    api.stop();
}

#[tokio::test]
async fn ztunnel_token_gets_node_from_token_extra() {
    let (api, client) = cluster().await;
    api.add_token(
        "zt",
        &["istio-ca"],
        sa_user(
            "istio-system",
            "ztunnel",
            json!({NODE_NAME_EXTRA: ["node1"], POD_NAME_EXTRA: ["ztunnel-a"]}),
        ),
    );
    let caller = authenticator(client)
        .authenticate(&bearer("zt"))
        .await
        .unwrap();
    assert_eq!(caller.node.as_deref(), Some("node1"));
    assert_eq!(
        caller.identity,
        Some(Identity::new("cluster.local", "istio-system", "ztunnel"))
    );
    assert_eq!(
        api.request_count("GET", "/api/v1/namespaces/istio-system/pods/ztunnel-a"),
        0
    );
    api.stop();
}

fn ztunnel_pod(name: &str, uid: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "istio-system", "uid": uid},
        "spec": {"containers": [{"name": "istio-proxy", "image": "ztunnel"}], "nodeName": node}})
}

#[tokio::test]
async fn ztunnel_token_without_node_extra_gets_node_of_bound_pod() {
    let (api, client) = cluster().await;
    api.apply("pods", ztunnel_pod("ztunnel-b", "uid-b", "node2"));
    let bound = |pod: &str, uid: &str| {
        sa_user(
            "istio-system",
            "ztunnel",
            json!({POD_NAME_EXTRA: [pod], POD_UID_EXTRA: [uid]}),
        )
    };
    api.add_token("zt-b", &["istio-ca"], bound("ztunnel-b", "uid-b"));
    // Bound to an earlier pod of the same name: its node is unknown.
    api.add_token("zt-old", &["istio-ca"], bound("ztunnel-b", "uid-old"));
    api.add_token("zt-gone", &["istio-ca"], bound("ztunnel-gone", "uid-gone"));
    let auth = authenticator(client);

    let caller = auth.authenticate(&bearer("zt-b")).await.unwrap();
    assert_eq!(caller.node.as_deref(), Some("node2"));
    for token in ["zt-old", "zt-gone"] {
        let caller = auth.authenticate(&bearer(token)).await.unwrap();
        assert_eq!(caller.node, None, "{token}");
    }

    // Pods of other service accounts are never looked up.
    api.add_token(
        "app",
        &["istio-ca"],
        sa_user(
            "shop",
            "cart",
            json!({POD_NAME_EXTRA: ["cart-1"], NODE_NAME_EXTRA: ["node2"]}),
        ),
    );
    let caller = auth.authenticate(&bearer("app")).await.unwrap();
    assert_eq!(caller.node, None);
    assert_eq!(
        api.request_count("GET", "/api/v1/namespaces/shop/pods/cart-1"),
        0
    );
    api.stop();
}

fn cert_request(
    id: &Identity,
    impersonate: bool,
    token: Option<&str>,
) -> Request<IstioCertificateRequest> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let metadata = impersonate.then(|| {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
            },
        );
        s
    });
    let mut req = Request::new(IstioCertificateRequest {
        csr: hbone::ca::make_csr(id, &key).unwrap(),
        validity_duration: 3600,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

#[tokio::test]
async fn ca_service_grants_own_identity_and_node_scoped_impersonation_only() {
    let (api, client) = cluster().await;
    api.add_token("cart", &["istio-ca"], sa_user("shop", "cart", json!({})));
    api.add_token(
        "zt",
        &["istio-ca"],
        sa_user(
            "istio-system",
            "ztunnel",
            json!({NODE_NAME_EXTRA: ["node1"]}),
        ),
    );
    let store = KubeRootStore::new(client.clone(), "istio-system");
    let ca = Arc::new(store.load_or_create_authority(config()).await.unwrap());
    // Every shop pod runs on node1.
    let on_node: NodeAuthorizer =
        Arc::new(|node: &str, id: &Identity| node == "node1" && id.namespace == "shop");
    let svc = CaService::new(ca, Arc::new(authenticator(client)), Some(on_node));
    let cart = Identity::new("cluster.local", "shop", "cart");
    let payments = Identity::new("cluster.local", "shop", "payments");
    let code = |r: Result<_, tonic::Status>| r.map(|_| Code::Ok).unwrap_or_else(|s| s.code());

    assert_eq!(
        code(
            svc.create_certificate(cert_request(&cart, false, Some("cart")))
                .await
        ),
        Code::Ok
    );
    // A workload cannot ask for someone else's identity, even one on an allowed node.
    assert_eq!(
        code(
            svc.create_certificate(cert_request(&payments, true, Some("cart")))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            svc.create_certificate(cert_request(&payments, false, Some("cart")))
                .await
        ),
        Code::InvalidArgument,
        "CSR for another identity than the caller's"
    );
    // The node proxy may, for pods on its node.
    assert_eq!(
        code(
            svc.create_certificate(cert_request(&payments, true, Some("zt")))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            svc.create_certificate(cert_request(&cart, false, None))
                .await
        ),
        Code::Unauthenticated
    );
    api.stop();
}
