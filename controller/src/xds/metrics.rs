//! Prometheus metrics of the xDS server.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Counters and gauges describing connected proxies and pushes.
#[derive(Clone, Debug)]
pub struct XdsMetrics {
    /// Open delta-ADS streams.
    pub connected: IntGauge,
    /// Responses sent, by type.
    pub pushes: IntCounterVec,
    /// Time from `update` to the response carrying the change, by type.
    pub push_latency: HistogramVec,
    /// NACKs received, by type.
    pub nacks: IntCounterVec,
    /// Resources (updates plus removals) sent, by type.
    pub resources_sent: IntCounterVec,
    /// Streams closed because the proxy fell behind the change log (it reconnects and resyncs).
    pub resyncs: IntCounter,
    /// Streams ended because a request broke the limits (too many types or names, oversized names).
    pub rejected: IntCounter,
}

impl XdsMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.connected.clone()))?;
        registry.register(Box::new(m.pushes.clone()))?;
        registry.register(Box::new(m.push_latency.clone()))?;
        registry.register(Box::new(m.nacks.clone()))?;
        registry.register(Box::new(m.resources_sent.clone()))?;
        registry.register(Box::new(m.resyncs.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        Ok(m)
    }

    /// Creates the metrics without registering them (tests, or when metrics are off).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        let by_type = &["type"];
        Ok(Self {
            connected: IntGauge::new("controller_xds_connected_proxies", "Open delta-ADS streams")?,
            pushes: IntCounterVec::new(
                Opts::new("controller_xds_pushes_total", "xDS responses sent"),
                by_type,
            )?,
            push_latency: HistogramVec::new(
                HistogramOpts::new(
                    "controller_xds_push_latency_seconds",
                    "Time from a resource update to the response carrying it",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                by_type,
            )?,
            nacks: IntCounterVec::new(
                Opts::new(
                    "controller_xds_nacks_total",
                    "xDS responses rejected by proxies",
                ),
                by_type,
            )?,
            resources_sent: IntCounterVec::new(
                Opts::new(
                    "controller_xds_resources_sent_total",
                    "Resources (updates and removals) sent to proxies",
                ),
                by_type,
            )?,
            resyncs: IntCounter::new(
                "controller_xds_resyncs_total",
                "Streams closed so a proxy that fell behind the change log resyncs",
            )?,
            rejected: IntCounter::new(
                "controller_xds_rejected_requests_total",
                "xDS streams ended because a request broke the per-stream limits",
            )?,
        })
    }
}

/// Short label for a type URL (`type.googleapis.com/istio.workload.Address` -> `Address`).
pub(crate) fn type_label(type_url: &str) -> &str {
    type_url.rsplit(['.', '/']).next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_label_is_the_message_name() {
        assert_eq!(type_label(xds::ADDRESS_TYPE), "Address");
        assert_eq!(type_label(xds::AUTHORIZATION_TYPE), "Authorization");
        assert_eq!(type_label("plain"), "plain");
    }

    #[test]
    fn metrics_register_once() {
        let r = Registry::new();
        XdsMetrics::new(&r).unwrap();
        assert!(
            XdsMetrics::new(&r).is_err(),
            "duplicate registration refused"
        );
    }
}
