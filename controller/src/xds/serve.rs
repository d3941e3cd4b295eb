//! Runs the gRPC listeners: ADS alone (15010, plaintext) or ADS plus the CA (15012, TLS).

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

use super::XdsServer;
use crate::ca::CaService;

/// Why a listener could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS identity is unusable.
    #[error("xDS/CA server TLS config: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The server failed while running.
    #[error("xDS/CA server: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// Serves ADS (and the CA when given) on `listener` until `shutdown` is cancelled; TLS when
/// `tls` is given (e.g. from `ServingCert::tls_config`). On shutdown every ADS stream of
/// `ads` is closed so proxies move to another instance.
pub async fn serve(
    listener: TcpListener,
    ads: XdsServer,
    ca: Option<CaService>,
    tls: Option<ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(ServeError::Tls)?;
    }
    let router = builder
        .add_service(ads.service())
        .add_optional_service(ca.map(|c| c.service()));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let signal = {
        let ads = ads.clone();
        async move {
            shutdown.cancelled().await;
            ads.close();
        }
    };
    router
        .serve_with_incoming_shutdown(incoming, signal)
        .await
        .map_err(ServeError::Transport)
}
