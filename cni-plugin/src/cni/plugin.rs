//! The plugin's commands. Synchronous and short-lived: one agent round trip per invocation, and
//! an API server lookup or a directory read only when the agent is down.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::apifallback::{API_TIMEOUT, pod_captured_from_api};
use super::fallback::pod_captured_in_dir;
use super::spec::{
    CniEnv, CniError, Command, NetConf, PodRef, code, error_version, extract_ips, require_version,
    version_result,
};
use crate::protocol::{self, Outcome, PluginCommand, PluginRequest, ProtocolError};

/// Largest stdin config accepted (bytes).
pub const MAX_STDIN: usize = 4 * 1024 * 1024;

/// What the binary prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    /// Text for stdout (a JSON result or error, or empty).
    pub stdout: String,
    /// Process exit code: 0 on success, 1 on error.
    pub exit_code: i32,
}

/// Runs one invocation and renders it as the runtime expects: result or error JSON, exit code.
pub fn execute(env: &HashMap<String, String>, stdin: &[u8]) -> Execution {
    match run(env, stdin) {
        Ok(Some(result)) => Execution {
            stdout: format!("{result}\n"),
            exit_code: 0,
        },
        Ok(None) => Execution {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => Execution {
            stdout: format!("{}\n", e.to_json(&error_version(stdin))),
            exit_code: 1,
        },
    }
}

/// Runs one invocation: `Some(result)` to print for ADD and VERSION, `None` for commands that
/// print nothing on success.
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command: Command = env
        .get("CNI_COMMAND")
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", ""))?
        .parse()?;
    if command == Command::Version {
        return Ok(Some(version_result()));
    }
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            code::DECODE,
            format!("network configuration larger than {MAX_STDIN} bytes"),
            "",
        ));
    }
    let conf = NetConf::parse(stdin)?;
    let log = Log::open(&conf);
    let outcome = match command {
        Command::Add | Command::Del | Command::Check => {
            let cni_env = CniEnv::from_env(command, env)?;
            let inv = Invocation {
                env: &cni_env,
                conf: &conf,
                log: &log,
            };
            match command {
                Command::Add => inv.add().map(Some),
                Command::Del => inv.del().map(|()| None),
                _ => inv.check().map(|()| None),
            }
        }
        Command::Gc => require_version(&conf, "GC", "1.1.0").map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Version => Ok(Some(version_result())),
    };
    if let Err(e) = &outcome {
        log.line(format_args!("{command:?} failed: {e}"));
    }
    outcome
}

/// STATUS: ready when the agent socket accepts connections.
fn status(conf: &NetConf) -> Result<(), CniError> {
    require_version(conf, "STATUS", "1.1.0")?;
    UnixStream::connect(&conf.agent_socket)
        .map(drop)
        .map_err(|e| {
            CniError::new(
                code::PLUGIN_NOT_AVAILABLE,
                format!(
                    "plugin not available: node agent unreachable at {}",
                    conf.agent_socket.display()
                ),
                e.to_string(),
            )
        })
}

/// One ADD, DEL or CHECK.
struct Invocation<'a> {
    env: &'a CniEnv,
    conf: &'a NetConf,
    log: &'a Log,
}

impl Invocation<'_> {
    /// ADD: enroll through the agent; the result is always the previous plugin's, unchanged.
    fn add(&self) -> Result<Value, CniError> {
        let result = self
            .conf
            .prev_result
            .clone()
            .unwrap_or_else(|| json!({"cniVersion": self.conf.cni_version}));
        let Some(pod) = &self.env.pod else {
            self.log.line(format_args!(
                "ADD {}: not a Kubernetes pod, passing through",
                self.env.container_id
            ));
            return Ok(result);
        };
        let ips = match &self.conf.prev_result {
            Some(prev) => extract_ips(prev)?,
            None => Vec::new(),
        };
        match self.call(PluginCommand::Add, pod, ips) {
            Ok((Outcome::Enrolled | Outcome::NotAmbient, _)) => Ok(result),
            Ok((outcome, message)) => Err(agent_failed("enroll", pod, outcome, message)),
            Err(ProtocolError::Unreachable { source, .. }) => {
                self.decide_without_agent(pod, &source)?;
                Ok(result)
            }
            Err(e) => Err(agent_busy(pod, e)),
        }
    }

    /// DEL: idempotent; an absent agent reconciles when it comes back, so that is success.
    fn del(&self) -> Result<(), CniError> {
        let Some(pod) = &self.env.pod else {
            return Ok(());
        };
        // The result may be stale or absent on DEL; IPs are a hint only.
        let ips = self
            .conf
            .prev_result
            .as_ref()
            .and_then(|p| extract_ips(p).ok())
            .unwrap_or_default();
        match self.call(PluginCommand::Del, pod, ips) {
            Ok((Outcome::Failed, message)) => {
                Err(agent_failed("remove", pod, Outcome::Failed, message))
            }
            Ok(_) => Ok(()),
            Err(ProtocolError::Unreachable { source, .. }) => {
                self.log.line(format_args!(
                    "DEL {pod}: agent unreachable ({source}); it reconciles on restart"
                ));
                Ok(())
            }
            Err(e) => Err(agent_busy(pod, e)),
        }
    }

    /// CHECK: the agent verifies the pod's redirection.
    fn check(&self) -> Result<(), CniError> {
        require_version(self.conf, "CHECK", "0.4.0")?;
        let Some(prev) = &self.conf.prev_result else {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "CHECK requires prevResult",
                "",
            ));
        };
        let Some(pod) = &self.env.pod else {
            return Ok(());
        };
        let ips = extract_ips(prev)?;
        match self.call(PluginCommand::Check, pod, ips) {
            Ok((Outcome::Verified | Outcome::NotAmbient, _)) => Ok(()),
            Ok((outcome, message)) => Err(agent_failed("verify", pod, outcome, message)),
            Err(ProtocolError::Unreachable { source, .. }) => {
                self.decide_without_agent(pod, &source)
            }
            Err(e) => Err(agent_busy(pod, e)),
        }
    }

    /// Asks the agent; returns its outcome and message.
    fn call(
        &self,
        command: PluginCommand,
        pod: &PodRef,
        ips: Vec<std::net::IpAddr>,
    ) -> Result<(Outcome, String), ProtocolError> {
        let req = PluginRequest {
            command,
            container_id: self.env.container_id.clone(),
            netns: self.env.netns.clone(),
            ifname: self.env.ifname.clone(),
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            ips,
        };
        let answer = protocol::call(&self.conf.agent_socket, &req, self.conf.agent_timeout());
        match &answer {
            Ok(r) => self.log.line(format_args!(
                "{command:?} {pod} ({}): {:?} {}",
                self.env.container_id, r.outcome, r.message
            )),
            Err(e) => self.log.line(format_args!(
                "{command:?} {pod} ({}): {e}",
                self.env.container_id
            )),
        }
        answer.map(|r| (r.outcome, r.message))
    }

    /// With the agent down, only a pod known not to be ambient may proceed (fail closed). The
    /// API server (`kubeconfig`, Kubernetes mode) or the YAML directory (`configDir`, files
    /// mode) is asked; both apply the same enrollment rule.
    fn decide_without_agent(&self, pod: &PodRef, cause: &std::io::Error) -> Result<(), CniError> {
        let socket = self.conf.agent_socket.display();
        let (source, verdict) = if let Some(kubeconfig) = self.conf.kubeconfig_path() {
            (
                format!("the API server (kubeconfig {})", kubeconfig.display()),
                pod_captured_from_api(kubeconfig, pod, API_TIMEOUT).map_err(|e| e.to_string()),
            )
        } else if let Some(dir) = &self.conf.config_dir {
            (dir.display().to_string(), pod_captured_in_dir(dir, pod))
        } else {
            return Err(CniError::new(
                code::AGENT_DOWN_AMBIENT,
                format!(
                    "node agent unreachable at {socket} and neither kubeconfig nor configDir is \
                     set to tell whether pod {pod} is ambient: refusing to start it without \
                     mesh redirection"
                ),
                cause.to_string(),
            ));
        };
        match verdict {
            Ok(false) => {
                self.log.line(format_args!(
                    "{pod}: agent unreachable, not ambient per {source}, passing through"
                ));
                Ok(())
            }
            Ok(true) => Err(CniError::new(
                code::AGENT_DOWN_AMBIENT,
                format!(
                    "pod {pod} is ambient but the node agent is unreachable at {socket}: \
                     refusing to start it without mesh redirection"
                ),
                cause.to_string(),
            )),
            Err(why) => Err(CniError::new(
                code::AGENT_DOWN_AMBIENT,
                format!(
                    "node agent unreachable at {socket} and cannot tell whether pod {pod} is \
                     ambient: refusing to start it without mesh redirection"
                ),
                format!("{why}; agent: {cause}"),
            )),
        }
    }
}

/// The agent refused (or answered nonsense for the command).
fn agent_failed(what: &str, pod: &PodRef, outcome: Outcome, message: String) -> CniError {
    let msg = if outcome == Outcome::Failed {
        format!("node agent failed to {what} pod {pod}")
    } else {
        format!("node agent answered {outcome:?}, which is not valid here, for pod {pod}")
    };
    CniError::new(code::AGENT_FAILED, msg, message)
}

/// The agent is there but did not answer properly in time: transient.
fn agent_busy(pod: &PodRef, e: ProtocolError) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("node agent did not answer for pod {pod}; try again later"),
        e.to_string(),
    )
}

/// Optional per-invocation log file (`logFile`); logging failures never fail the command.
struct Log(Option<File>);

impl Log {
    fn open(conf: &NetConf) -> Self {
        Log(conf
            .log_file
            .as_ref()
            .and_then(|p| OpenOptions::new().create(true).append(true).open(p).ok()))
    }

    fn line(&self, args: fmt::Arguments<'_>) {
        let Some(mut f) = self.0.as_ref() else { return };
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        // One write per line so concurrent invocations do not interleave within a line.
        let _ =
            f.write_all(format!("{secs:.3} mesh-cni[{}] {args}\n", std::process::id()).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_AGENT: &str = "/nonexistent/mesh-cni-test/plugin.sock";

    fn env(command: &str, cni_args: &str) -> HashMap<String, String> {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/pod1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", cni_args),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web";

    fn prev_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/pod1"}],
            "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "custom": {"nested": [1, 2.5, null, true, "x"]}
        })
    }

    fn conf(extra: Value) -> Vec<u8> {
        let mut c = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "mesh-cni",
            "agentSocket": NO_AGENT,
            "agentTimeoutSeconds": 2,
            "runtimeConfig": {"portMappings": []},
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        serde_json::to_vec(&c).unwrap()
    }

    #[test]
    fn version_prints_supported_versions_without_reading_config() {
        let out = execute(&env("VERSION", ""), b"");
        assert_eq!(out.exit_code, 0);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn add_for_non_kubernetes_container_passes_prev_result_through_unchanged() {
        let stdin = conf(json!({"prevResult": prev_result()}));
        let out = execute(&env("ADD", "IgnoreUnknown=1"), &stdin);
        assert_eq!(out.exit_code, 0, "{}", out.stdout);
        let printed: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(printed, prev_result());
    }

    #[test]
    fn add_without_prev_result_prints_minimal_result() {
        let got = run(&env("ADD", ""), &conf(json!({}))).unwrap();
        assert_eq!(got, Some(json!({"cniVersion": "1.0.0"})));
    }

    #[test]
    fn add_with_agent_down_and_no_config_dir_fails_closed() {
        let stdin = conf(json!({"prevResult": prev_result()}));
        let out = execute(&env("ADD", POD_ARGS), &stdin);
        assert_eq!(out.exit_code, 1);
        let err: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(err["code"], code::AGENT_DOWN_AMBIENT);
        assert_eq!(err["cniVersion"], "1.0.0");
        let msg = err["msg"].as_str().unwrap();
        assert!(msg.contains("shop/web") && msg.contains(NO_AGENT), "{msg}");
    }

    #[test]
    fn add_with_unreadable_prev_result_ips_is_rejected() {
        let stdin = conf(json!({"prevResult": {"ips": [{"address": "bogus/24"}]}}));
        let err = run(&env("ADD", POD_ARGS), &stdin).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
    }

    #[test]
    fn del_with_agent_down_succeeds_silently() {
        let mut e = env("DEL", POD_ARGS);
        e.remove("CNI_NETNS");
        let out = execute(&e, &conf(json!({})));
        assert_eq!(
            out,
            Execution {
                stdout: String::new(),
                exit_code: 0
            }
        );
    }

    #[test]
    fn check_requires_prev_result_and_a_recent_version() {
        let err = run(&env("CHECK", POD_ARGS), &conf(json!({}))).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        let old = conf(json!({"cniVersion": "0.3.1", "prevResult": prev_result()}));
        let err = run(&env("CHECK", POD_ARGS), &old).unwrap_err();
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
        let plain = conf(json!({"prevResult": prev_result()}));
        assert_eq!(run(&env("CHECK", ""), &plain), Ok(None));
    }

    #[test]
    fn gc_succeeds_and_status_reports_agent_down_as_not_available() {
        let v11 = conf(json!({"cniVersion": "1.1.0"}));
        let gc: HashMap<String, String> = [("CNI_COMMAND".to_string(), "GC".to_string())].into();
        assert_eq!(run(&gc, &v11), Ok(None));
        let status: HashMap<String, String> =
            [("CNI_COMMAND".to_string(), "STATUS".to_string())].into();
        assert_eq!(
            run(&status, &v11).unwrap_err().code,
            code::PLUGIN_NOT_AVAILABLE
        );
        let v10 = conf(json!({}));
        assert_eq!(run(&gc, &v10).unwrap_err().code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn missing_or_unknown_command_is_invalid_env() {
        let err = run(&HashMap::new(), &conf(json!({}))).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENV);
        let out = execute(&env("FROB", ""), &conf(json!({})));
        assert_eq!(out.exit_code, 1);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], code::INVALID_ENV);
        assert!(v["msg"].as_str().unwrap().contains("FROB"));
    }

    #[test]
    fn failures_are_appended_to_the_log_file() {
        let log = std::env::temp_dir().join(format!("mesh-cni-log-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let stdin = conf(json!({"logFile": log}));
        assert!(run(&env("ADD", POD_ARGS), &stdin).is_err());
        let text = std::fs::read_to_string(&log).unwrap();
        let _ = std::fs::remove_file(&log);
        assert!(text.contains("Add failed"), "{text}");
        assert!(text.contains("shop/web"), "{text}");
    }
}
