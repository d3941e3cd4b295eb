//! Who is calling: bearer-token authentication shared by the CA and the xDS server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hbone::Identity;
use serde::Deserialize;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// The authenticated caller of a gRPC request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// The workload identity the caller proved, if any.
    pub identity: Option<Identity>,
    /// The node the caller is a node proxy for, if any.
    pub node: Option<String>,
}

/// Authenticates a request from its gRPC metadata.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    /// Returns the caller, or `Unauthenticated` when the credentials are missing or wrong.
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status>;
}

/// Any `Fn(&MetadataMap) -> Result<Caller, Status>` is an authenticator (tests, simple hooks).
#[tonic::async_trait]
impl<F> Authenticator for F
where
    F: Fn(&MetadataMap) -> Result<Caller, Status> + Send + Sync,
{
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        self(metadata)
    }
}

/// Says whether a pod with `identity` runs on `node` (decides `ImpersonatedIdentity` requests).
pub type NodeAuthorizer = Arc<dyn Fn(&str, &Identity) -> bool + Send + Sync>;

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization bearer token"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| Status::unauthenticated("authorization is not a bearer token"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Status::unauthenticated(
            "authorization is not a bearer token",
        ));
    }
    Ok(token)
}

/// Why a node token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The YAML does not have the expected shape.
    #[error("parsing node tokens: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A node has an empty token.
    #[error("node {0:?} has an empty token")]
    EmptyToken(String),
    /// Two nodes share a token, so a caller could not be told apart.
    #[error("nodes {0:?} and {1:?} share a token")]
    DuplicateToken(String, String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    nodes: BTreeMap<String, String>,
}

/// Files-mode authentication: each node proxy holds a static token (`{nodes: {node1: token1}}`).
#[derive(Clone, Default)]
pub struct NodeTokens {
    /// (token, node), searched in full on every call so timing does not reveal a prefix.
    tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for NodeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are secrets: only the node names are shown.
        let nodes: Vec<&str> = self.tokens.iter().map(|(_, n)| n.as_str()).collect();
        f.debug_struct("NodeTokens").field("nodes", &nodes).finish()
    }
}

impl NodeTokens {
    /// Builds from node name -> token.
    pub fn new(nodes: BTreeMap<String, String>) -> Result<Self, TokenFileError> {
        let mut tokens: Vec<(String, String)> = Vec::with_capacity(nodes.len());
        for (node, token) in nodes {
            let token = token.trim().to_string();
            if token.is_empty() {
                return Err(TokenFileError::EmptyToken(node));
            }
            if let Some((_, other)) = tokens.iter().find(|(t, _)| *t == token) {
                return Err(TokenFileError::DuplicateToken(other.clone(), node));
            }
            tokens.push((token, node));
        }
        Ok(Self { tokens })
    }

    /// Parses `{nodes: {node1: token1, ...}}`.
    pub fn from_yaml(yaml: &str) -> Result<Self, TokenFileError> {
        let file: TokenFile = serde_yaml::from_str(yaml)?;
        Self::new(file.nodes)
    }

    /// Reads and parses a token file.
    pub async fn load(path: &Path) -> Result<Self, TokenFileError> {
        let yaml = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| TokenFileError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_yaml(&yaml)
    }

    /// The node a token belongs to.
    pub fn node_for(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (t, node) in &self.tokens {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(node.as_str());
            }
        }
        found
    }

    /// Number of known nodes.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl Authenticator for NodeTokens {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        let node = self
            .node_for(token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        Ok(Caller {
            identity: None,
            node: Some(node.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = auth {
            m.insert("authorization", a.parse().unwrap());
        }
        m
    }

    #[tokio::test]
    async fn node_tokens_map_bearer_token_to_node() {
        let t = NodeTokens::from_yaml("nodes:\n  node1: tok1\n  node2: tok2\n").unwrap();
        assert_eq!(t.len(), 2);
        let c = t.authenticate(&md(Some("Bearer tok2"))).await.unwrap();
        assert_eq!(c.node.as_deref(), Some("node2"));
        assert_eq!(c.identity, None);
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Basic tok1"),
            Some("Bearer "),
            Some("tok1"),
        ] {
            let err = t.authenticate(&md(bad)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn node_tokens_reject_bad_files() {
        assert!(matches!(
            NodeTokens::from_yaml("nodes: {a: x, b: x}"),
            Err(TokenFileError::DuplicateToken(_, _))
        ));
        assert!(matches!(
            NodeTokens::from_yaml("nodes: {a: ' '}"),
            Err(TokenFileError::EmptyToken(_))
        ));
        assert!(matches!(
            NodeTokens::from_yaml("nodez: {}"),
            Err(TokenFileError::Yaml(_))
        ));
        let debug = format!("{:?}", NodeTokens::from_yaml("nodes: {a: secret}").unwrap());
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[tokio::test]
    async fn closures_are_authenticators() {
        let f = |m: &MetadataMap| -> Result<Caller, Status> {
            bearer_token(m).map(|t| Caller {
                identity: None,
                node: Some(t.to_string()),
            })
        };
        let a: Arc<dyn Authenticator> = Arc::new(f);
        let c = a.authenticate(&md(Some("bearer n1"))).await.unwrap();
        assert_eq!(c.node.as_deref(), Some("n1"));
    }
}
