//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: authenticate, decide which
//! identity the caller may hold, sign.

use std::sync::Arc;

use hbone::Identity;
use tonic::{Request, Response, Status};
use xds::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use xds::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

use super::{Authenticator, CaError, Caller, CertificateAuthority, NodeAuthorizer};

/// Metadata key naming the identity a node proxy requests on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The CA gRPC service.
#[derive(Clone)]
pub struct CaService {
    authority: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    node_authorizer: Option<NodeAuthorizer>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("authority", &self.authority)
            .field("impersonation", &self.node_authorizer.is_some())
            .finish()
    }
}

impl CaService {
    /// A service signing with `authority` for callers `auth` accepts. Without a node
    /// authorizer, impersonation is always refused.
    pub fn new(
        authority: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        node_authorizer: Option<NodeAuthorizer>,
    ) -> Self {
        Self {
            authority,
            auth,
            node_authorizer,
        }
    }

    /// The tonic service.
    pub fn service(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self)
    }

    /// The identity `caller` may be issued for this request.
    fn granted_identity(
        &self,
        caller: &Caller,
        metadata: Option<&prost_types::Struct>,
    ) -> Result<Identity, Status> {
        let impersonated = metadata
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .map(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => s
                    .parse::<Identity>()
                    .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}"))),
                _ => Err(Status::invalid_argument(format!(
                    "{IMPERSONATED_IDENTITY} must be a string"
                ))),
            })
            .transpose()?;
        let id = match impersonated {
            Some(id) => {
                let node = caller.node.as_deref().ok_or_else(|| {
                    Status::permission_denied("only node proxies may request another identity")
                })?;
                let allowed = self
                    .node_authorizer
                    .as_ref()
                    .is_some_and(|runs_on| runs_on(node, &id));
                if !allowed {
                    return Err(Status::permission_denied(format!(
                        "no pod with identity {id} runs on node {node}"
                    )));
                }
                id
            }
            None => caller.identity.clone().ok_or_else(|| {
                Status::permission_denied(format!(
                    "caller has no workload identity; node proxies must set {IMPERSONATED_IDENTITY}"
                ))
            })?,
        };
        if id.trust_domain != self.authority.trust_domain() {
            return Err(Status::permission_denied(format!(
                "{id} is outside trust domain {}",
                self.authority.trust_domain()
            )));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let req = request.into_inner();
        let id = match self.granted_identity(&caller, req.metadata.as_ref()) {
            Ok(id) => id,
            Err(status) => {
                tracing::warn!(node = ?caller.node, caller = ?caller.identity.as_ref().map(|i| i.to_string()), reason = %status.message(), "certificate request refused");
                return Err(status);
            }
        };
        let ttl = self.authority.ttl_for(req.validity_duration);
        let cert_chain = self
            .authority
            .sign_csr(&req.csr, &id, ttl)
            .map_err(|e| match e {
                CaError::Csr(_) => Status::invalid_argument(e.to_string()),
                other => {
                    tracing::error!(error = %other, "signing failed");
                    Status::internal("signing failed")
                }
            })?;
        tracing::info!(identity = %id, node = ?caller.node, ttl_secs = ttl.as_secs(), "issued workload certificate");
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
