//! The CNI specification as it concerns a chained plugin: commands, environment, `CNI_ARGS`,
//! the network configuration on stdin, version negotiation and the error result.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::protocol::DEFAULT_AGENT_SOCKET;

/// Spec versions this plugin accepts in `cniVersion`.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest spec version implemented; used when the config's version is unknown.
pub const CURRENT_VERSION: &str = "1.1.0";
/// Default `agentTimeoutSeconds`.
pub const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 30;

/// Error codes of the spec (1-99) and of this plugin (100+).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid or missing environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (e.g. reading stdin).
    pub const IO: u32 = 5;
    /// Failed to decode content (malformed JSON).
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Transient failure; the runtime should retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs right now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// The node agent answered `Failed` (or an outcome that makes no sense for the command).
    pub const AGENT_FAILED: u32 = 100;
    /// The node agent is down and the pod is (or may be) ambient: refused, fail closed.
    pub const AGENT_DOWN_AMBIENT: u32 = 101;
}

/// A CNI error result: printed on stdout as `{"cniVersion","code","msg","details"}`, exit 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    /// Spec or plugin error code.
    pub code: u32,
    /// Short description.
    pub msg: String,
    /// Longer detail (the underlying cause); may be empty.
    pub details: String,
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.details.is_empty() {
            write!(f, "{} (code {})", self.msg, self.code)
        } else {
            write!(f, "{}: {} (code {})", self.msg, self.details, self.code)
        }
    }
}

impl std::error::Error for CniError {}

impl CniError {
    /// An error with the given code, message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error result object for a config of `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach the container to the network.
    Add,
    /// Detach the container.
    Del,
    /// Verify the container's networking.
    Check,
    /// Report supported versions.
    Version,
    /// Garbage-collect stale attachments (1.1.0).
    Gc,
    /// Report readiness (1.1.0).
    Status,
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        match s {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "VERSION" => Ok(Command::Version),
            "GC" => Ok(Command::Gc),
            "STATUS" => Ok(Command::Status),
            other => Err(CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
                "",
            )),
        }
    }
}

/// The pod a sandbox belongs to, from `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`, when given.
    pub uid: Option<String>,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`); empty segments are ignored, a segment without `=` is an error.
pub fn parse_cni_args(raw: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for part in raw.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("invalid CNI_ARGS pair {part:?}: expected KEY=VALUE"),
                "",
            ));
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// The pod named by `CNI_ARGS`: `None` when it names no Kubernetes pod at all; an error when it
/// names only half of one (never guess the other half: that could skip an ambient pod).
pub fn pod_from_args(args: &BTreeMap<String, String>) -> Result<Option<PodRef>, CniError> {
    let get = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
    match (get("K8S_POD_NAMESPACE"), get("K8S_POD_NAME")) {
        (None, None) => Ok(None),
        (Some(namespace), Some(name)) => Ok(Some(PodRef {
            namespace,
            name,
            uid: get("K8S_POD_UID"),
        })),
        _ => Err(CniError::new(
            code::INVALID_ENV,
            "CNI_ARGS names a pod only partially: K8S_POD_NAMESPACE and K8S_POD_NAME must both be set",
            "",
        )),
    }
}

/// The environment of an ADD, DEL or CHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on DEL).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The pod from `CNI_ARGS`, if any.
    pub pod: Option<PodRef>,
    /// `CNI_PATH` (unused by this plugin, which delegates to nothing).
    pub path: Option<String>,
}

impl CniEnv {
    /// Reads and validates the variables `command` needs.
    pub fn from_env(command: Command, env: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let require = |k: &str| {
            get(k).ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("required environment variable {k} is missing"),
                    "",
                )
            })
        };
        let netns = if command == Command::Del {
            get("CNI_NETNS").unwrap_or_default()
        } else {
            require("CNI_NETNS")?
        };
        let args = parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))?;
        Ok(Self {
            container_id: require("CNI_CONTAINERID")?,
            netns,
            ifname: require("CNI_IFNAME")?,
            pod: pod_from_args(&args)?,
            path: get("CNI_PATH"),
        })
    }
}

/// The network configuration given on stdin. Unknown fields (runtimeConfig, capabilities,
/// args, ...) are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version of the config (and of `prevResult`).
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Plugin type (`mesh-cni`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The previous plugin's result, passed through unchanged.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The node agent's plugin socket.
    #[serde(default = "default_agent_socket")]
    pub agent_socket: PathBuf,
    /// Deadline for each step of the agent exchange.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_seconds: u64,
    /// Directory of Kubernetes YAML used to decide enrollment while the agent is down.
    #[serde(default)]
    pub config_dir: Option<PathBuf>,
    /// Kubeconfig for reading the pod and namespace from the API server while the agent is
    /// down (Kubernetes mode).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Istio's plugin config block; its `kubeconfig` is honoured when the top-level one is unset.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConf>,
    /// File to append a log line per invocation to.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
}

/// The `kubernetes` block of Istio's plugin config (only what this plugin uses).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct KubernetesConf {
    /// Path of the kubeconfig the plugin uses to reach the API server.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}

fn default_agent_timeout() -> u64 {
    DEFAULT_AGENT_TIMEOUT_SECS
}

impl NetConf {
    /// Parses and validates the stdin config: malformed JSON is code 6, wrong or missing fields
    /// code 7, an unsupported `cniVersion` code 1.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            let c = if e.is_data() {
                code::INVALID_CONFIG
            } else {
                code::DECODE
            };
            CniError::new(c, "cannot parse the network configuration", e.to_string())
        })?;
        check_version(&conf.cni_version)?;
        if conf.agent_timeout_seconds == 0 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "agentTimeoutSeconds must be at least 1",
                "",
            ));
        }
        Ok(conf)
    }

    /// The agent exchange deadline.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_seconds)
    }

    /// The kubeconfig for the API fallback: top-level `kubeconfig`, else `kubernetes.kubeconfig`.
    pub fn kubeconfig_path(&self) -> Option<&Path> {
        self.kubeconfig
            .as_deref()
            .or_else(|| self.kubernetes.as_ref()?.kubeconfig.as_deref())
            .filter(|p| !p.as_os_str().is_empty())
    }
}

/// Best-effort `cniVersion` of a config, for labelling an error result; the current version if
/// the config is unreadable or its version unsupported.
pub fn error_version(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    serde_json::from_slice::<V>(stdin)
        .ok()
        .map(|v| v.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CURRENT_VERSION.to_string())
}

/// Fails with code 1 unless `version` is one of [`SUPPORTED_VERSIONS`].
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("incompatible CNI version {version:?}"),
        format!("this plugin supports {}", SUPPORTED_VERSIONS.join(", ")),
    ))
}

/// True if `version` is `min` or newer (both `major.minor.patch`; unparsable counts as older).
pub fn version_at_least(version: &str, min: &str) -> bool {
    fn parse(v: &str) -> Option<(u32, u32, u32)> {
        let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
        let t = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(t)
    }
    match (parse(version), parse(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

/// Fails with code 1 when `command` did not exist in the config's spec version.
pub fn require_version(conf: &NetConf, command: &str, min: &str) -> Result<(), CniError> {
    if version_at_least(&conf.cni_version, min) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "{command} needs cniVersion {min} or newer, the config has {}",
            conf.cni_version
        ),
        "",
    ))
}

/// The VERSION command's result.
pub fn version_result() -> Value {
    json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// Pod IPs from a result's `ips[].address` (CIDR strings), in order, without duplicates.
pub fn extract_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let invalid = |details: String| {
        CniError::new(
            code::INVALID_CONFIG,
            "invalid prevResult: cannot read the pod IPs",
            details,
        )
    };
    let ips = match result.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(ips)) => ips,
        Some(other) => return Err(invalid(format!("`ips` is not a list: {other}"))),
    };
    let mut out = Vec::with_capacity(ips.len());
    for entry in ips {
        let Some(cidr) = entry.get("address").and_then(Value::as_str) else {
            return Err(invalid(format!(
                "entry without a string `address`: {entry}"
            )));
        };
        let addr = cidr.split_once('/').map_or(cidr, |(a, _)| a);
        let ip: IpAddr = addr
            .parse()
            .map_err(|e| invalid(format!("address {cidr:?}: {e}")))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_split_into_pairs_and_tolerate_empty_segments() {
        let args = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop; K8S_POD_NAME=web-0;;K8S_POD_UID=u-1;X=a=b;",
        )
        .unwrap();
        assert_eq!(args["IgnoreUnknown"], "1");
        assert_eq!(args["K8S_POD_NAMESPACE"], "shop");
        assert_eq!(args["K8S_POD_NAME"], "web-0");
        assert_eq!(args["X"], "a=b");
        let pod = pod_from_args(&args).unwrap().unwrap();
        assert_eq!(
            pod,
            PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some("u-1".into()),
            }
        );
        assert_eq!(pod.to_string(), "shop/web-0");
        assert!(parse_cni_args("").unwrap().is_empty());
    }

    #[test]
    fn malformed_or_partial_cni_args_are_invalid_env() {
        let err = parse_cni_args("K8S_POD_NAME=a;garbage").unwrap_err();
        assert_eq!(err.code, code::INVALID_ENV);
        let half = parse_cni_args("K8S_POD_NAME=web").unwrap();
        assert_eq!(pod_from_args(&half).unwrap_err().code, code::INVALID_ENV);
        let none = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=").unwrap();
        assert_eq!(pod_from_args(&none).unwrap(), None);
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn add_needs_netns_but_del_does_not() {
        let base = [("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")];
        let err = CniEnv::from_env(Command::Add, &env(&base)).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENV);
        assert!(err.msg.contains("CNI_NETNS"), "{err}");
        let del = CniEnv::from_env(Command::Del, &env(&base)).unwrap();
        assert_eq!(del.netns, "");
        assert_eq!(del.pod, None);
        let err = CniEnv::from_env(Command::Del, &env(&[("CNI_IFNAME", "eth0")])).unwrap_err();
        assert!(err.msg.contains("CNI_CONTAINERID"), "{err}");
    }

    #[test]
    fn config_defaults_apply_and_unknown_fields_are_tolerated() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"mesh-cni",
                "runtimeConfig":{"portMappings":[]},"capabilities":{"x":true},"args":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(conf.agent_timeout(), Duration::from_secs(30));
        assert_eq!(conf.config_dir, None);
        assert_eq!(conf.kubeconfig_path(), None);
        assert_eq!(conf.prev_result, None);
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"k8s","type":"mesh-cni","agentSocket":"/s.sock",
                "agentTimeoutSeconds":3,"configDir":"/etc/mesh","logFile":"/l","prevResult":{"ips":[]}}"#,
        )
        .unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from("/s.sock"));
        assert_eq!(conf.agent_timeout(), Duration::from_secs(3));
        assert_eq!(conf.config_dir, Some(PathBuf::from("/etc/mesh")));
        assert_eq!(conf.prev_result, Some(json!({"ips": []})));
    }

    #[test]
    fn kubeconfig_comes_from_top_level_or_istio_kubernetes_block() {
        let parse = |extra: &str| {
            let text = format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"mesh-cni"{extra}}}"#);
            NetConf::parse(text.as_bytes()).unwrap()
        };
        let istio = parse(
            r#","kubernetes":{"kubeconfig":"/etc/cni/net.d/ZZZ-kubeconfig","cni_bin_dir":"/opt/cni/bin"}"#,
        );
        assert_eq!(
            istio.kubeconfig_path(),
            Some(Path::new("/etc/cni/net.d/ZZZ-kubeconfig"))
        );
        let both = parse(r#","kubeconfig":"/k","kubernetes":{"kubeconfig":"/other"}"#);
        assert_eq!(both.kubeconfig_path(), Some(Path::new("/k")));
        assert_eq!(parse(r#","kubeconfig":"""#).kubeconfig_path(), None);
    }

    #[test]
    fn bad_configs_map_to_spec_codes() {
        let code_of = |s: &[u8]| NetConf::parse(s).unwrap_err().code;
        assert_eq!(code_of(b"{not json"), code::DECODE);
        assert_eq!(code_of(b""), code::DECODE);
        assert_eq!(code_of(br#"{"name":"n","type":"t"}"#), code::INVALID_CONFIG);
        assert_eq!(
            code_of(br#"{"cniVersion":"1.0.0","name":"n","type":"t","agentTimeoutSeconds":"x"}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(br#"{"cniVersion":"1.0.0","name":"n","type":"t","agentTimeoutSeconds":0}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#),
            code::INCOMPATIBLE_VERSION
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(version_at_least("0.10.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("garbage", "0.4.0"));
        assert_eq!(error_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(error_version(br#"{"cniVersion":"9.9.9"}"#), CURRENT_VERSION);
        assert_eq!(error_version(b"nope"), CURRENT_VERSION);
    }

    #[test]
    fn version_result_lists_every_supported_version() {
        assert_eq!(
            version_result(),
            json!({
                "cniVersion": "1.1.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
            })
        );
    }

    #[test]
    fn error_json_has_the_spec_shape() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "agent busy", "timed out");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent busy", "details": "timed out"})
        );
        assert_eq!(e.to_string(), "agent busy: timed out (code 11)");
    }

    #[test]
    fn ips_are_taken_from_cidrs_in_order_without_duplicates() {
        let prev = json!({"ips": [
            {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
            {"address": "fd00::5/64"},
            {"address": "10.1.0.5/24"},
            {"address": "10.1.0.6"},
        ]});
        let ips = extract_ips(&prev).unwrap();
        let want: Vec<IpAddr> = ["10.1.0.5", "fd00::5", "10.1.0.6"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(ips, want);
        assert!(
            extract_ips(&json!({"cniVersion": "1.0.0"}))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn unreadable_ips_are_invalid_config() {
        for bad in [
            json!({"ips": "10.0.0.1"}),
            json!({"ips": [{"gateway": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.300/24"}]}),
        ] {
            assert_eq!(extract_ips(&bad).unwrap_err().code, code::INVALID_CONFIG);
        }
    }
}
