//! A minimal Kubernetes API client: GET a JSON object, or stream a watch line by line, over
//! HTTP/1.1 (hyper) with TLS from rustls (ring). One connection per request: the agent makes
//! a list, a long-lived watch, and a rare owner lookup, nothing a pool would help.
//!
//! In a pod, [`ApiConfig::in_cluster`] reads the service account's token (again for every
//! request: bound tokens rotate) and CA, and `KUBERNETES_SERVICE_HOST` / `_PORT`.
//! [`ApiConfig::from_url`] points it elsewhere: `kubectl proxy` (`http://127.0.0.1:8001`), or a
//! test server.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, StatusCode,
    body::{Bytes, Incoming},
};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Where the service account's credentials are mounted in every pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Connecting and receiving response headers, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole GET (list or lookup), at most.
const GET_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response body read for a GET (a list of a node's pods is well below).
const MAX_BODY: usize = 64 << 20;
/// Longest watch line (one object; etcd limits objects to 1.5 MiB).
const MAX_LINE: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Bearer token, re-read for every request.
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that signs the API server's certificate (required for https).
    pub ca_file: Option<PathBuf>,
}

impl ApiConfig {
    /// The in-cluster configuration, or `None` when not running in a pod (no
    /// `KUBERNETES_SERVICE_HOST`).
    pub fn in_cluster() -> anyhow::Result<Option<Self>> {
        let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") else {
            return Ok(None);
        };
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .unwrap_or_else(|_| "443".into())
            .parse()
            .context("KUBERNETES_SERVICE_PORT")?;
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        for file in ["token", "ca.crt"] {
            anyhow::ensure!(
                dir.join(file).exists(),
                "{} missing: is a service account token mounted (automountServiceAccountToken)?",
                dir.join(file).display()
            );
        }
        Ok(Some(Self {
            https: true,
            host,
            port,
            token_file: Some(dir.join("token")),
            ca_file: Some(dir.join("ca.crt")),
        }))
    }

    /// `http://host:port` or `https://host:port` (IPv6 hosts in brackets), no path.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            bail!("{url}: not an http:// or https:// URL");
        };
        let authority = rest.trim_end_matches('/');
        anyhow::ensure!(!authority.contains('/'), "{url}: give no path");
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').context("unclosed [")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().context("port")?,
                None => default_port,
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().context("port")?),
                None => (authority.to_owned(), default_port),
            }
        };
        anyhow::ensure!(!host.is_empty(), "{url}: no host");
        Ok(Self {
            https,
            host,
            port,
            token_file: None,
            ca_file: None,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why a request failed: the API answered with an error status, or it could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("HTTP {code}: {message}")]
    Status { code: u16, message: String },
    #[error(transparent)]
    Transport(#[from] anyhow::Error),
}

impl ApiError {
    pub fn code(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            ApiError::Transport(_) => None,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: ApiConfig,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl ApiClient {
    pub fn new(config: ApiConfig) -> anyhow::Result<Self> {
        let tls = if config.https {
            let ca = config
                .ca_file
                .as_deref()
                .context("https needs a CA bundle (ca_file)")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("read {}", ca.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("parse {}", ca.display()))?)
                    .with_context(|| format!("a certificate of {}", ca.display()))?;
            }
            anyhow::ensure!(!roots.is_empty(), "{}: no certificate", ca.display());
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls)))
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner { config, tls }),
        })
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        let config = &self.inner.config;
        let tcp = TcpStream::connect(config.authority())
            .await
            .with_context(|| format!("connect to {}", config.authority()))?;
        tcp.set_nodelay(true)?;
        match &self.inner.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let name = ServerName::try_from(config.host.clone())
                    .with_context(|| format!("server name {}", config.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {}", config.authority()))?;
                Ok(Box::new(stream))
            }
        }
    }

    /// Sends `GET path_and_query`; returns the response if its status is 2xx.
    async fn send(&self, path_and_query: &str) -> Result<hyper::Response<Incoming>, ApiError> {
        let io = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            // Ends when the response body is dropped or the peer closes.
            let _ = connection.await;
        });
        let mut request = Request::get(path_and_query)
            .header(hyper::header::HOST, self.inner.config.authority())
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("profiler-agent/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(file) = &self.inner.config.token_file {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("read the token {}", file.display()))?;
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .context("build the request")?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("GET {path_and_query}"))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        Err(status_error(status, response).await)
    }

    /// GETs a JSON object.
    pub async fn get<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, ApiError> {
        let fetch = async {
            let response = self.send(path_and_query).await?;
            let body = read_body(response.into_body(), MAX_BODY).await?;
            serde_json::from_slice(&body)
                .with_context(|| format!("decode the response to {path_and_query}"))
                .map_err(ApiError::from)
        };
        tokio::time::timeout(GET_TIMEOUT, fetch)
            .await
            .map_err(|_| {
                anyhow::anyhow!("GET {path_and_query}: no answer within {GET_TIMEOUT:?}")
            })?
    }

    /// Starts a streaming GET (a watch): the response's lines, as they come.
    pub async fn stream(&self, path_and_query: &str) -> Result<LineStream, ApiError> {
        let response = tokio::time::timeout(CONNECT_TIMEOUT * 3, self.send(path_and_query))
            .await
            .map_err(|_| anyhow::anyhow!("GET {path_and_query}: no response headers in time"))??;
        Ok(LineStream {
            body: response.into_body(),
            buf: Vec::new(),
            finished: false,
        })
    }
}

async fn status_error(status: StatusCode, response: hyper::Response<Incoming>) -> ApiError {
    let body = read_body(response.into_body(), 64 << 10)
        .await
        .unwrap_or_default();
    // The API explains itself in a Status object; anything else is quoted as text.
    let message = serde_json::from_slice::<super::api::Status>(&body)
        .ok()
        .map(|s| s.message)
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    ApiError::Status {
        code: status.as_u16(),
        message,
    }
}

async fn read_body(mut body: Incoming, limit: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.context("read the response body")?.into_data() {
            anyhow::ensure!(
                out.len() + data.len() <= limit,
                "response larger than {limit} bytes"
            );
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// The lines of a streaming response (a watch: one JSON event per line).
pub struct LineStream {
    body: Incoming,
    buf: Vec<u8>,
    finished: bool,
}

impl LineStream {
    /// The next non-empty line, or `None` when the server ended the response.
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, ApiError> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.truncate(end);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.finished {
                // A last line without a newline.
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                return Ok(Some(std::mem::take(&mut self.buf)));
            }
            match Pin::new(&mut self.body).frame().await {
                None => self.finished = true,
                Some(frame) => {
                    if let Ok(data) = frame.context("read the watch stream")?.into_data() {
                        if self.buf.len() + data.len() > MAX_LINE {
                            return Err(
                                anyhow::anyhow!("watch line longer than {MAX_LINE} bytes").into()
                            );
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_api_urls() {
        let c = ApiConfig::from_url("http://127.0.0.1:8001").unwrap();
        assert_eq!(
            (c.https, c.host.as_str(), c.port),
            (false, "127.0.0.1", 8001)
        );
        let c = ApiConfig::from_url("https://[fd00::1]:6443/").unwrap();
        assert_eq!((c.https, c.host.as_str(), c.port), (true, "fd00::1", 6443));
        assert_eq!(c.authority(), "[fd00::1]:6443");
        let c = ApiConfig::from_url("https://kubernetes.default.svc").unwrap();
        assert_eq!(c.port, 443);
        assert!(ApiConfig::from_url("ftp://x").is_err());
        assert!(ApiConfig::from_url("http://x/api").is_err());
        assert!(ApiConfig::from_url("http://:80").is_err());
    }

    #[test]
    fn https_needs_a_ca() {
        let config = ApiConfig::from_url("https://10.0.0.1").unwrap();
        assert!(ApiClient::new(config).is_err());
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            encode_query_value("spec.nodeName=node-1.example"),
            "spec.nodeName%3Dnode-1.example"
        );
        assert_eq!(encode_query_value("a b/c"), "a%20b%2Fc");
    }
}
