//! Istio ztunnel's standalone YAML config (LOCAL_XDS_PATH).
