//! Facts every component reads the same way from a Pod: its IPs and its service account.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

/// The pod's IPs as reported in status (`podIPs`, else `podIP`), unparsable entries skipped.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|s| s.parse().ok())
    {
        ips.push(ip);
    }
    ips.dedup();
    ips
}

/// The pod's service account (`serviceAccountName`, else the deprecated `serviceAccount`,
/// else "default").
pub fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone().or(s.service_account.clone()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodStatus};

    #[test]
    fn pod_ips_prefer_the_list_and_fall_back_to_pod_ip() {
        let mut p = Pod {
            status: Some(PodStatus {
                pod_ip: Some("10.0.0.1".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(pod_ips(&p), vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        p.status.as_mut().unwrap().pod_ips = Some(vec![
            PodIP {
                ip: "10.0.0.2".into(),
            },
            PodIP {
                ip: "fd00::2".into(),
            },
        ]);
        assert_eq!(pod_ips(&p).len(), 2);
        assert_eq!(service_account(&p), "default");
    }
}
