//! Agent metrics (Prometheus text format on the monitoring port).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the agent exports.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on `/metrics`.
    pub registry: Registry,
    /// Pods with redirection installed and handed to ztunnel.
    pub enrolled_pods: IntGauge,
    /// Time from an enrollment decision to rules installed and ztunnel's ack (or queueing).
    pub enrollment_seconds: Histogram,
    /// Enrollments that failed, by reason.
    pub enrollment_failures: IntCounterVec,
    /// Enrolled pods whose redirection had drifted and was re-applied.
    pub repairs: IntCounter,
    /// Plugin requests by command and outcome.
    pub plugin_requests: IntCounterVec,
    /// Connected ztunnels.
    pub ztunnel_connections: IntGauge,
    /// Config source errors (malformed documents, watch failures).
    pub config_errors: IntCounter,
    /// eBPF mode: connections dropped for want of a registered ztunnel listener, by direction,
    /// summed over enrolled pods at the last check.
    pub ebpf_dropped: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let enrolled_pods = IntGauge::new(
            "mesh_cni_enrolled_pods",
            "Pods with in-pod redirection installed and handed to ztunnel",
        )
        .expect("valid metric");
        let enrollment_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_cni_enrollment_duration_seconds",
                "Time to install a pod's redirection and hand it to ztunnel",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        let enrollment_failures = IntCounterVec::new(
            Opts::new(
                "mesh_cni_enrollment_failures_total",
                "Pod enrollments that failed, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let repairs = IntCounter::new(
            "mesh_cni_repairs_total",
            "Enrolled pods whose redirection rules had drifted and were re-applied",
        )
        .expect("valid metric");
        let plugin_requests = IntCounterVec::new(
            Opts::new(
                "mesh_cni_plugin_requests_total",
                "CNI plugin requests by command and outcome",
            ),
            &["command", "outcome"],
        )
        .expect("valid metric");
        let ztunnel_connections = IntGauge::new(
            "mesh_cni_ztunnel_connections",
            "ztunnel processes connected over ZDS",
        )
        .expect("valid metric");
        let config_errors = IntCounter::new(
            "mesh_cni_config_errors_total",
            "Config source errors (malformed documents, watch failures)",
        )
        .expect("valid metric");
        let ebpf_dropped = IntGaugeVec::new(
            Opts::new(
                "mesh_cni_ebpf_dropped_connections",
                "eBPF mode: connections dropped because no ztunnel listener was registered in \
                 the pod, by direction, summed over enrolled pods at the last check",
            ),
            &["direction"],
        )
        .expect("valid metric");
        for m in [
            Box::new(enrolled_pods.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ebpf_dropped.clone()),
            Box::new(enrollment_seconds.clone()),
            Box::new(enrollment_failures.clone()),
            Box::new(repairs.clone()),
            Box::new(plugin_requests.clone()),
            Box::new(ztunnel_connections.clone()),
            Box::new(config_errors.clone()),
        ] {
            registry.register(m).expect("unique metric names");
        }
        Self {
            registry,
            enrolled_pods,
            enrollment_seconds,
            enrollment_failures,
            repairs,
            plugin_requests,
            ztunnel_connections,
            config_errors,
            ebpf_dropped,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
