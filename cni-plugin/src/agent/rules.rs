//! In-pod redirection (PROTOCOLS.md §6): one nftables table plus policy routing for connmark
//! 0x111, programmed inside a pod netns by running the `nft` and `ip` binaries in it (the child
//! joins the netns with `setns` before exec).
//!
//! - [`apply`] replaces the table atomically (`add`/`delete`/define in one `nft -f -`
//!   transaction) and adds the ip rule only when it is missing, the route with `replace`.
//! - [`verify`] compares the live `nft list table` output with a canonical listing: what this
//!   host's `nft` prints back for our text (nft normalizes syntax, e.g. `0xfff` becomes
//!   `0x00000fff`). The canonical listing is computed once per config by applying the text in a
//!   scratch netns (a short-lived thread unshares a fresh netns, kept alive by its fd) and cached
//!   for the life of the process. That works before any apply (agent restart) and never trusts
//!   a pod's possibly tampered state.
//! - IPv6 is programmed only when asked for and usable in the pod: the stack exists and
//!   `net.ipv6.conf.lo.disable_ipv6` is 0 there (the `local ::/0 dev lo` route is refused
//!   otherwise). When IPv6 is not programmed, IPv6 traffic bypasses redirection, as in Istio.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};

use super::nsexec::{COMMAND_TIMEOUT, command_line, failed, on_fresh_thread, run, run_ok};
use nix::sched::CloneFlags;

/// Name of our nftables table (family `inet`).
pub const TABLE: &str = "istio-ambient";

/// The nft text (PROTOCOLS.md §6). A line ending in ` [v6]`, ` [v4only]` or ` [dns]` is kept
/// only when IPv6 is on, IPv6 is off, or DNS capture is on. Why the rules are as they are:
/// - 0x539/0xfff marks ztunnel's own sockets: never redirected; the ones it spoofs towards the
///   app get connmark 0x111 so the `output` chain marks the app's replies, which the ip rule
///   then routes back to ztunnel over `lo`.
/// - 169.254.7.127 / fd16:9254:7127:1337:ffff:ffff:ffff:ffff are kubelet probes (host SNAT).
/// - `tproxy ip`/`tproxy ip6` each act only on their family; `redirect to :P` needs the l4proto
///   match in the same rule; `priority dstnat` is rejected for output nat chains.
/// - Without IPv6, IPv6 traffic bypasses redirection (as Istio does without ip6tables).
/// - `add` + `delete` first makes the transaction succeed whether or not the table exists.
const TEMPLATE: &str = r#"add table inet istio-ambient
delete table inet istio-ambient
table inet istio-ambient {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta nfproto ipv6 return [v4only]
		meta mark & 0xfff == 0x539 ct mark set 0x111
		iifname "lo" return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return [v6]
		ip saddr 169.254.7.127 return
		ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return [v6]
		tcp dport 15008 return
		meta l4proto tcp tproxy ip to :15006 meta mark set 0x111 accept
		meta l4proto tcp tproxy ip6 to :15006 meta mark set 0x111 accept [v6]
	}

	chain output {
		type route hook output priority mangle; policy accept;
		ct mark & 0xfff == 0x111 meta mark set 0x111
	}

	chain output_nat {
		type nat hook output priority -100; policy accept;
		meta nfproto ipv6 return [v4only]
		meta mark & 0xfff == 0x539 return
		oifname "lo" return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return [v6]
		udp dport 53 redirect to :15053 [dns]
		tcp dport 53 redirect to :15053 [dns]
		meta l4proto tcp redirect to :15001
	}
}
"#;

const NFT: &str = "nft";
const IP: &str = "ip";

/// What to program in a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RedirectConfig {
    /// Redirect DNS (UDP and TCP port 53) to ztunnel's DNS proxy.
    pub dns_capture: bool,
    /// Also redirect IPv6 (skipped in pods where IPv6 is disabled).
    pub ipv6: bool,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        RedirectConfig {
            dns_capture: false,
            ipv6: true,
        }
    }
}

/// Result of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Table, ip rules and routes are as [`apply`] leaves them.
    Intact,
    /// Something differs; `what` says what, for logs.
    Drifted {
        /// Human-readable description of the first difference found.
        what: String,
    },
}

/// Failure to program or inspect a pod netns.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The command could not be started.
    #[error("starting `{command}`: {source}")]
    Spawn {
        /// Command line.
        command: String,
        /// Cause.
        source: io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// Command line.
        command: String,
        /// Exit status.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// The command did not finish in time (it is killed).
    #[error("`{command}` timed out after {COMMAND_TIMEOUT:?}")]
    Timeout {
        /// Command line.
        command: String,
    },
    /// The command printed something we cannot interpret.
    #[error("unexpected output of `{command}`: {detail}")]
    Output {
        /// Command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// Loading, pinning or removing the eBPF programs failed.
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    /// Entering or creating a network namespace failed.
    #[error("{what}: {source}")]
    Netns {
        /// The step that failed.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
}

/// The nft text for `cfg`: one transaction that replaces any previous table.
pub fn ruleset(cfg: &RedirectConfig) -> String {
    let mut out = String::new();
    for line in TEMPLATE.lines() {
        let (text, keep) = match line.rsplit_once(" [") {
            Some((text, "v6]")) => (text, cfg.ipv6),
            Some((text, "v4only]")) => (text, !cfg.ipv6),
            Some((text, "dns]")) => (text, cfg.dns_capture),
            _ => (line, true),
        };
        if keep {
            out.push_str(text);
            out.push('\n');
        }
    }
    out
}

/// The nft text that creates the table only if it does not exist yet: the whole transaction
/// fails with EEXIST otherwise. Creating is several times cheaper than replacing (no hooks to
/// unregister, so no RCU grace period inside the commit), and a new pod has no table.
pub fn create_ruleset(cfg: &RedirectConfig) -> String {
    let full = ruleset(cfg);
    let body = full
        .lines()
        .skip_while(|l| l.starts_with("add table") || l.starts_with("delete table"))
        .collect::<Vec<_>>()
        .join("\n");
    format!("create table inet {TABLE}\n{body}\n")
}

/// Programs redirection in the pod netns; idempotent.
pub async fn apply(netns: &File, cfg: &RedirectConfig) -> Result<(), RulesError> {
    let ns = netns.as_fd();
    let eff = effective(netns, cfg).await?;
    // Policy routing over rtnetlink in-process: spawning `ip` per rule dominated enrollment
    // latency. Order does not matter: packets are only marked once both are in place for a
    // connection ztunnel spoofs, which needs ztunnel's listeners first.
    let v6 = eff.ipv6;
    let routing = in_pod(
        netns,
        "programming policy routing (fwmark rule, local route)",
        move || super::routing::ensure(v6),
    );
    // The nft transaction and the routing are independent; run them side by side.
    let nft = async {
        // Fast path for a pod without our table; replace atomically when one exists.
        let created = run(ns, NFT, &["-f", "-"], Some(&create_ruleset(&eff))).await?;
        if created.status.success() {
            return Ok(());
        }
        if !String::from_utf8_lossy(&created.stderr).contains("File exists") {
            return Err(failed(NFT, &["-f", "-"], &created));
        }
        run_ok(ns, NFT, &["-f", "-"], Some(&ruleset(&eff)))
            .await
            .map(drop)
    };
    let (routed, nft) = tokio::join!(routing, nft);
    routed?;
    nft?;
    Ok(())
}

/// Removes our table, ip rules and routes; succeeds when they are already gone.
pub async fn remove(netns: &File) -> Result<(), RulesError> {
    let ns = netns.as_fd();
    let text = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
    run_ok(ns, NFT, &["-f", "-"], Some(&text)).await?;
    let v6 = ipv6_state(netns).await?;
    for fam in [Family::V4, Family::V6] {
        // Without an IPv6 stack there is nothing to remove (and `ip -6` fails).
        if fam == Family::V6 && v6 == V6State::Absent {
            continue;
        }
        for _ in 0..matching_rules(ns, fam).await? {
            run_ok(ns, IP, &rule_args(fam, "del"), None).await?;
        }
        if has_route(ns, fam).await? {
            run_ok(ns, IP, &route_args(fam, "del"), None).await?;
        }
    }
    Ok(())
}

/// Checks the pod netns still holds exactly what [`apply`] programs for `cfg`.
pub async fn verify(netns: &File, cfg: &RedirectConfig) -> Result<Verification, RulesError> {
    Ok(verify_since(netns, cfg, None).await?.0)
}

/// Like [`verify`], but when the netns's nftables generation is still `known` (what an earlier
/// intact verification returned) nothing can have changed our table, and it is not listed
/// again: the periodic check then spawns no process at all (rules, routes and the generation
/// are read over netlink). Returns the generation to pass next time, `None` after drift.
pub async fn verify_since(
    netns: &File,
    cfg: &RedirectConfig,
    known: Option<u32>,
) -> Result<(Verification, Option<u32>), RulesError> {
    let eff = effective(netns, cfg).await?;
    let v6 = eff.ipv6;
    let seen = in_pod(
        netns,
        "reading policy routing and the nftables generation",
        move || super::routing::inspect(v6),
    )
    .await?;
    for (i, &fam) in families(&eff).iter().enumerate() {
        if seen.rules[i] == 0 {
            return Ok((
                drifted(format!(
                    "ip {} rule fwmark {MARK_SPEC} lookup {TABLE_SPEC} is missing",
                    fam.flag()
                )),
                None,
            ));
        }
        if !seen.routes[i] {
            return Ok((
                drifted(format!(
                    "ip {} route local {} dev lo table {TABLE_SPEC} is missing",
                    fam.flag(),
                    fam.default_dst()
                )),
                None,
            ));
        }
    }
    if known == Some(seen.nft_generation) {
        return Ok((Verification::Intact, known));
    }
    let ns = netns.as_fd();
    let args = ["list", "table", "inet", TABLE];
    let out = run(ns, NFT, &args, None).await?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok((drifted(format!("table inet {TABLE} is missing")), None));
        }
        return Err(failed(NFT, &args, &out));
    }
    let live = normalize(&String::from_utf8_lossy(&out.stdout));
    let want = canonical_listing(&eff).await?;
    if let Some(diff) = first_difference(&want, &live) {
        return Ok((drifted(format!("table inet {TABLE} differs: {diff}")), None));
    }
    // Read before listing: a change in between makes the next check list again.
    Ok((Verification::Intact, Some(seen.nft_generation)))
}

/// Canonical listings, keyed by (effective) config; at most four entries.
static CANONICAL: Mutex<Vec<(RedirectConfig, Arc<str>)>> = Mutex::new(Vec::new());

/// Normalized `nft list table` output for `cfg`'s ruleset, computed once in a scratch netns.
pub async fn canonical_listing(cfg: &RedirectConfig) -> Result<Arc<str>, RulesError> {
    let cached = |cache: &Mutex<Vec<(RedirectConfig, Arc<str>)>>| {
        let guard = cache.lock().unwrap_or_else(|e| e.into_inner());
        guard.iter().find(|(c, _)| c == cfg).map(|(_, l)| l.clone())
    };
    if let Some(hit) = cached(&CANONICAL) {
        return Ok(hit);
    }
    let scratch = on_fresh_thread(|| {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
        File::open("/proc/thread-self/ns/net")
    })
    .await
    .map_err(|source| RulesError::Netns {
        what: "creating a scratch netns",
        source,
    })?;
    let ns = scratch.as_fd();
    run_ok(ns, NFT, &["-f", "-"], Some(&ruleset(cfg))).await?;
    let listed = run_ok(ns, NFT, &["list", "table", "inet", TABLE], None).await?;
    let listing: Arc<str> = normalize(&listed).into();
    let mut guard = CANONICAL.lock().unwrap_or_else(|e| e.into_inner());
    if !guard.iter().any(|(c, _)| c == cfg) {
        guard.push((*cfg, listing.clone()));
    }
    Ok(listing)
}

/// Strips `# handle N` comments and blank lines and collapses whitespace.
fn normalize(listing: &str) -> String {
    listing
        .lines()
        .map(|l| {
            let l = l.split("# handle").next().unwrap_or_default();
            l.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first line where `live` departs from `want`, described for logs.
fn first_difference(want: &str, live: &str) -> Option<String> {
    let (mut w, mut l) = (want.lines(), live.lines());
    loop {
        match (w.next(), l.next()) {
            (None, None) => return None,
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => return Some(format!("expected `{a}`, found `{b}`")),
            (Some(a), None) => return Some(format!("expected `{a}`, found the end")),
            (None, Some(b)) => return Some(format!("unexpected `{b}`")),
        }
    }
}

fn drifted(what: String) -> Verification {
    Verification::Drifted { what }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_dst(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

fn families(cfg: &RedirectConfig) -> &'static [Family] {
    if cfg.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    }
}

const MARK_SPEC: &str = "0x111/0xfff";
const TABLE_SPEC: &str = "100";
const PREF_SPEC: &str = "32764";

/// `ip -4|-6 rule <verb> fwmark 0x111/0xfff pref 32764 lookup 100`.
fn rule_args(fam: Family, verb: &'static str) -> Vec<&'static str> {
    let tail = ["fwmark", MARK_SPEC, "pref", PREF_SPEC, "lookup", TABLE_SPEC];
    [fam.flag(), "rule", verb].into_iter().chain(tail).collect()
}

/// `ip -4|-6 route <verb> local <default> dev lo table 100`.
fn route_args(fam: Family, verb: &'static str) -> Vec<&'static str> {
    let tail = [fam.default_dst(), "dev", "lo", "table", TABLE_SPEC];
    [fam.flag(), "route", verb, "local"]
        .into_iter()
        .chain(tail)
        .collect()
}

/// How many copies of our fwmark rule exist.
async fn matching_rules(ns: BorrowedFd<'_>, fam: Family) -> Result<usize, RulesError> {
    let args = [fam.flag(), "-j", "rule", "show"];
    let out = run_ok(ns, IP, &args, None).await?;
    count_our_rules(&out).map_err(|detail| RulesError::Output {
        command: command_line(IP, &args),
        detail,
    })
}

/// Whether our `local default dev lo table 100` route exists.
async fn has_route(ns: BorrowedFd<'_>, fam: Family) -> Result<bool, RulesError> {
    // `table all` rather than `table 100`: the latter fails when the table does not exist yet.
    let args = [fam.flag(), "-j", "route", "show", "table", "all"];
    let out = run_ok(ns, IP, &args, None).await?;
    has_our_route(&out).map_err(|detail| RulesError::Output {
        command: command_line(IP, &args),
        detail,
    })
}

fn json_array(text: &str) -> Result<Vec<serde_json::Value>, String> {
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_str(text).map_err(|e| format!("not a JSON array: {e}"))
}

fn field<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|f| f.as_str())
}

/// Counts `ip -j rule show` entries equal to `pref 32764 from all fwmark 0x111/0xfff lookup 100`.
fn count_our_rules(json: &str) -> Result<usize, String> {
    let ours = |r: &&serde_json::Value| {
        r.get("priority")
            .and_then(|p| p.as_u64())
            .map(|p| p.to_string())
            .as_deref()
            == Some(PREF_SPEC)
            && field(r, "src") == Some("all")
            && field(r, "fwmark") == Some("0x111")
            && field(r, "fwmask") == Some("0xfff")
            && field(r, "table") == Some(TABLE_SPEC)
            && r.get("not").is_none()
    };
    Ok(json_array(json)?.iter().filter(ours).count())
}

/// Finds `local default dev lo` in table 100 in `ip -j route show table all` output.
fn has_our_route(json: &str) -> Result<bool, String> {
    Ok(json_array(json)?.iter().any(|r| {
        field(r, "type") == Some("local")
            && field(r, "dst") == Some("default")
            && field(r, "dev") == Some("lo")
            && field(r, "table") == Some(TABLE_SPEC)
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V6State {
    /// No IPv6 stack in the kernel.
    Absent,
    /// `disable_ipv6` is set on `lo` in the pod.
    Disabled,
    /// Usable.
    Enabled,
}

async fn ipv6_state(netns: &File) -> Result<V6State, RulesError> {
    in_pod(netns, "reading IPv6 settings in the pod netns", || {
        // /proc/sys/net shows the reading thread's netns.
        match std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6") {
            Ok(v) if v.trim() == "0" => Ok(V6State::Enabled),
            Ok(_) => Ok(V6State::Disabled),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(V6State::Absent),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Runs blocking `f` inside the pod's netns, on a thread that ends afterwards (so the agent's
/// own threads never change namespace); `what` names the step in the error.
pub(super) async fn in_pod<T: Send + 'static>(
    netns: &File,
    what: &'static str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, RulesError> {
    let fd = netns.try_clone().map_err(|source| RulesError::Netns {
        what: "duplicating the netns fd",
        source,
    })?;
    on_fresh_thread(move || {
        nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .await
    .map_err(|source| RulesError::Netns { what, source })
}

/// `cfg` with IPv6 turned off when the pod cannot use it.
async fn effective(netns: &File, cfg: &RedirectConfig) -> Result<RedirectConfig, RulesError> {
    let mut eff = *cfg;
    if eff.ipv6 && ipv6_state(netns).await? != V6State::Enabled {
        eff.ipv6 = false;
    }
    Ok(eff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_ruleset_only_creates_and_fails_if_the_table_exists() {
        let cfg = RedirectConfig::default();
        let text = create_ruleset(&cfg);
        assert!(text.starts_with("create table inet istio-ambient\ntable inet istio-ambient {"));
        assert!(!text.contains("delete table"));
        // Same table body as the replacing transaction.
        assert!(
            ruleset(&cfg).ends_with(text.trim_start_matches("create table inet istio-ambient\n"))
        );
    }
    use std::path::PathBuf;

    fn testdata() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/agent/testdata")
    }

    fn cases() -> [(&'static str, RedirectConfig); 3] {
        [
            ("default", RedirectConfig::default()),
            (
                "dns_capture",
                RedirectConfig {
                    dns_capture: true,
                    ipv6: true,
                },
            ),
            (
                "ipv4_only",
                RedirectConfig {
                    dns_capture: false,
                    ipv6: false,
                },
            ),
        ]
    }

    #[test]
    fn ruleset_matches_golden_files() {
        let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
        let mut failures = vec![];
        for (name, cfg) in cases() {
            let path = testdata().join(format!("{name}.nft"));
            let got = ruleset(&cfg);
            if update {
                std::fs::write(&path, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_default();
            if want != got {
                failures.push(format!(
                    "{name}: differs from {} (UPDATE_GOLDEN=1 to regenerate)\n--- got ---\n{got}",
                    path.display()
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn ruleset_replaces_previous_table_in_one_transaction() {
        let text = ruleset(&RedirectConfig::default());
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some(format!("add table inet {TABLE}").as_str())
        );
        assert_eq!(
            lines.next(),
            Some(format!("delete table inet {TABLE}").as_str())
        );
        assert_eq!(
            lines.next(),
            Some(format!("table inet {TABLE} {{").as_str())
        );
        assert_eq!(text.matches("table inet").count(), 3);
        // Every condition tag was recognized and stripped.
        for cfg in cases().map(|(_, c)| c) {
            assert!(!ruleset(&cfg).contains(" ["), "{cfg:?}");
        }
    }

    #[test]
    fn variants_add_ipv6_bypass_or_dns_capture_where_configured() {
        let v4 = ruleset(&RedirectConfig {
            dns_capture: false,
            ipv6: false,
        });
        assert!(!v4.contains("ip6 "), "{v4}");
        assert_eq!(v4.matches("meta nfproto ipv6 return").count(), 2);
        let v6 = ruleset(&RedirectConfig::default());
        assert!(v6.contains("tproxy ip6 to :15006"));
        assert!(!v6.contains("nfproto") && !v6.contains(":15053"));
        let dns = ruleset(&RedirectConfig {
            dns_capture: true,
            ipv6: true,
        });
        let at = |needle: &str| dns.find(needle).unwrap();
        assert!(at("== 0x539 return") < at("udp dport 53 redirect to :15053"));
        assert!(at("tcp dport 53 redirect to :15053") < at("redirect to :15001"));
    }

    #[test]
    fn normalize_drops_handles_blank_lines_and_extra_whitespace() {
        let listed = "table inet t { # handle 7\n\tchain c { # handle 1\n\n\t\ttcp  dport 1 return # handle 3\n\t}\n}\n";
        assert_eq!(
            normalize(listed),
            "table inet t {\nchain c {\ntcp dport 1 return\n}\n}"
        );
    }

    #[test]
    fn first_difference_reports_changed_missing_and_extra_lines() {
        assert_eq!(first_difference("a\nb", "a\nb"), None);
        assert_eq!(
            first_difference("a\nb", "a\nc").as_deref(),
            Some("expected `b`, found `c`")
        );
        assert_eq!(
            first_difference("a\nb", "a").as_deref(),
            Some("expected `b`, found the end")
        );
        assert_eq!(
            first_difference("a", "a\nz").as_deref(),
            Some("unexpected `z`")
        );
    }

    #[test]
    fn only_our_fwmark_rule_is_counted() {
        let json = r#"[{"priority":0,"src":"all","table":"local"},
            {"priority":32764,"src":"all","fwmark":"0x111","fwmask":"0xfff","table":"100"},
            {"priority":32764,"src":"all","fwmark":"0x111","fwmask":"0xfff","table":"100"},
            {"priority":32764,"src":"all","not":null,"fwmark":"0x111","fwmask":"0xfff","table":"100"},
            {"priority":32764,"src":"all","fwmark":"0x111","fwmask":"0xfff","table":"133"},
            {"priority":32765,"src":"all","fwmark":"0x111","fwmask":"0xfff","table":"100"},
            {"priority":32766,"src":"all","table":"main"}]"#;
        assert_eq!(count_our_rules(json), Ok(2));
        assert_eq!(count_our_rules("[]"), Ok(0));
        assert!(count_our_rules("garbage").is_err());
    }

    #[test]
    fn route_is_found_only_as_local_default_via_lo_in_table_100() {
        let ours = r#"[{"type":"local","dst":"default","dev":"lo","table":"100","scope":"host","flags":[]}]"#;
        assert_eq!(has_our_route(ours), Ok(true));
        let others = r#"[{"type":"local","dst":"127.0.0.0/8","dev":"lo","table":"local"},
            {"type":"unicast","dst":"default","dev":"lo","table":"100"},
            {"type":"local","dst":"default","dev":"lo","table":"133"}]"#;
        assert_eq!(has_our_route(others), Ok(false));
        assert_eq!(has_our_route(""), Ok(false));
    }
}
