//! Sending one encoded request: OTLP/gRPC (`ProfilesService/Export`, the generated tonic
//! client) or OTLP/HTTP (`POST …/v1development/profiles`, protobuf body), with gzip, custom
//! headers, TLS through rustls (system roots plus an optional custom CA) and a per-request
//! timeout. Failures are classified as the OTLP specification says, so the queue knows what
//! to retry and how long the server asked it to wait.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
    profiles_service_client::ProfilesServiceClient,
};
use prost::Message as _;
use tonic::{
    Code,
    codec::CompressionEncoding,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::StatusExt as _;

use super::config::{Compression, OtlpConfig, Protocol};

/// Why a request was not delivered; callers branch on retryable or not.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Worth sending again; `retry_after` is the server's own delay (gRPC RetryInfo, HTTP
    /// Retry-After), if it gave one.
    #[error("{reason} (retryable)")]
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Sending it again would fail the same way: the request is dropped.
    #[error("{reason}")]
    Permanent { reason: String },
}

/// What the receiver said about a delivered request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// `partial_success.rejected_profiles`.
    pub rejected_profiles: i64,
    /// `partial_success.error_message` (a warning when nothing was rejected).
    pub message: String,
    /// Bytes on the wire (HTTP body after compression); None when the client compresses
    /// internally (gRPC).
    pub wire_bytes: Option<usize>,
}

impl Delivered {
    fn from_response(response: ExportProfilesServiceResponse, wire_bytes: Option<usize>) -> Self {
        let partial = response.partial_success.unwrap_or_default();
        Self {
            rejected_profiles: partial.rejected_profiles,
            message: partial.error_message,
            wire_bytes,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Retry { after: Option<Duration> },
    Drop,
}

/// OTLP/gRPC: these codes are transient. RESOURCE_EXHAUSTED is retried only when the server
/// says when (RetryInfo); without it the server is out of capacity for good, or the request
/// is too large.
pub fn classify_grpc(code: Code, retry_info: Option<Option<Duration>>) -> Disposition {
    match code {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Disposition::Retry {
            after: retry_info.flatten(),
        },
        Code::ResourceExhausted => match retry_info {
            Some(after) => Disposition::Retry { after },
            None => Disposition::Drop,
        },
        _ => Disposition::Drop,
    }
}

/// OTLP/HTTP: 429, 502, 503 and 504 are transient, with the server's Retry-After if any.
pub fn classify_http(status: u16, retry_after: Option<&str>) -> Disposition {
    match status {
        429 | 502 | 503 | 504 => Disposition::Retry {
            after: retry_after.and_then(parse_retry_after),
        },
        _ => Disposition::Drop,
    }
}

/// `Retry-After` as delay-seconds. (The HTTP-date form is ignored: the backoff applies.)
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn error(reason: String, disposition: Disposition) -> ExportError {
    match disposition {
        Disposition::Retry { after } => ExportError::Retryable {
            reason,
            retry_after: after,
        },
        Disposition::Drop => ExportError::Permanent { reason },
    }
}

/// A connected (lazily) client for the configured protocol.
pub enum Transport {
    Grpc(Box<GrpcTransport>),
    Http(HttpTransport),
}

impl Transport {
    /// Builds the client; connections are made when the first request is sent. Must be called
    /// inside the tokio runtime.
    pub fn new(config: &OtlpConfig) -> anyhow::Result<Self> {
        let ca = match &config.ca_cert {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("read the OTLP CA certificate {}: {e}", path.display())
            })?),
            None => None,
        };
        Ok(match config.protocol {
            Protocol::Grpc => Transport::Grpc(Box::new(GrpcTransport::new(config, ca)?)),
            Protocol::HttpProtobuf => Transport::Http(HttpTransport::new(config, ca)?),
        })
    }

    /// Sends one encoded `ExportProfilesServiceRequest`.
    pub async fn export(&self, body: Bytes) -> Result<Delivered, ExportError> {
        match self {
            Transport::Grpc(t) => t.export(body).await,
            Transport::Http(t) => t.export(body).await,
        }
    }
}

pub struct GrpcTransport {
    client: ProfilesServiceClient<Channel>,
    headers: MetadataMap,
    timeout: Duration,
}

impl GrpcTransport {
    fn new(config: &OtlpConfig, ca: Option<Vec<u8>>) -> anyhow::Result<Self> {
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| anyhow::anyhow!("OTLP endpoint {}: {e}", config.endpoint))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout);
        if config.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = ca {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| anyhow::anyhow!("OTLP TLS configuration: {e}"))?;
        }
        let mut client = ProfilesServiceClient::new(endpoint.connect_lazy())
            .accept_compressed(CompressionEncoding::Gzip);
        if config.compression == Compression::Gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let mut headers = MetadataMap::new();
        for (key, value) in &config.headers {
            let key = MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                .map_err(|_| anyhow::anyhow!("OTLP header name {key:?} is not valid for gRPC"))?;
            let value = MetadataValue::try_from(value.as_str())
                .map_err(|_| anyhow::anyhow!("OTLP header {key} has an invalid value"))?;
            headers.insert(key, value);
        }
        Ok(Self {
            client,
            headers,
            timeout: config.timeout,
        })
    }

    async fn export(&self, body: Bytes) -> Result<Delivered, ExportError> {
        // The queue keeps requests encoded (compact, sized); the generated client wants the
        // message.
        let message =
            ExportProfilesServiceRequest::decode(body).map_err(|e| ExportError::Permanent {
                reason: format!("cannot decode a queued request: {e}"),
            })?;
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = self.headers.clone();
        request.set_timeout(self.timeout);
        match self.client.clone().export(request).await {
            Ok(response) => Ok(Delivered::from_response(response.into_inner(), None)),
            Err(status) => {
                let retry_info = status.get_details_retry_info().map(|info| info.retry_delay);
                let reason = format!("gRPC {:?}: {}", status.code(), status.message());
                Err(error(reason, classify_grpc(status.code(), retry_info)))
            }
        }
    }
}

pub struct HttpTransport {
    client: reqwest::Client,
    url: String,
    gzip: bool,
}

/// How much of an error response's body is kept for the log.
const ERROR_BODY_LIMIT: usize = 512;

impl HttpTransport {
    fn new(config: &OtlpConfig, ca: Option<Vec<u8>>) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (key, value) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| anyhow::anyhow!("OTLP header name {key:?} is not valid"))?;
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| anyhow::anyhow!("OTLP header {key} has an invalid value"))?;
            headers.insert(name, value);
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.timeout)
            .connect_timeout(config.timeout);
        if let Some(pem) = ca {
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("OTLP CA certificate: {e}"))?;
            builder = builder.add_root_certificate(certificate);
        }
        Ok(Self {
            client: builder
                .build()
                .map_err(|e| anyhow::anyhow!("OTLP HTTP client: {e}"))?,
            url: config.endpoint.clone(),
            gzip: config.compression == Compression::Gzip,
        })
    }

    async fn export(&self, body: Bytes) -> Result<Delivered, ExportError> {
        let payload = if self.gzip {
            // Compression takes milliseconds per MiB: off the runtime's worker threads.
            tokio::task::spawn_blocking(move || gzip(&body))
                .await
                .map_err(|e| ExportError::Permanent {
                    reason: format!("compression task failed: {e}"),
                })?
        } else {
            body
        };
        let wire_bytes = payload.len();
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf");
        if self.gzip {
            request = request.header(reqwest::header::CONTENT_ENCODING, "gzip");
        }
        // Connection refused, reset, timeouts: the network or the receiver is down for now.
        let response = request
            .body(payload)
            .send()
            .await
            .map_err(|e| ExportError::Retryable {
                reason: format!("HTTP request failed: {}", error_chain(&e)),
                retry_after: None,
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            // An empty body is a full success; a body that does not decode is one too (the data
            // was accepted), with nothing to report.
            let response = ExportProfilesServiceResponse::decode(body).unwrap_or_default();
            return Ok(Delivered::from_response(response, Some(wire_bytes)));
        }
        let reason = format!("HTTP {status}: {}", error_message(&body));
        Err(error(
            reason,
            classify_http(status.as_u16(), retry_after.as_deref()),
        ))
    }
}

/// The message of an OTLP/HTTP error body (a protobuf `google.rpc.Status`), or its text.
fn error_message(body: &[u8]) -> String {
    if let Ok(status) = tonic_types::Status::decode(body)
        && !status.message.is_empty()
    {
        return status.message;
    }
    String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_LIMIT)]).into_owned()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// gzip at the fast level: the agent's CPU on every node counts for more than a few percent
/// of bytes that are already ~10 per sample.
pub fn gzip(raw: &[u8]) -> Bytes {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(raw);
    Bytes::from(encoder.finish().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_retryable_as_the_spec_says() {
        let retry = Disposition::Retry { after: None };
        for code in [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ] {
            assert_eq!(classify_grpc(code, None), retry, "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Unimplemented,
            Code::Internal,
            Code::Unknown,
            Code::FailedPrecondition,
        ] {
            assert_eq!(classify_grpc(code, None), Disposition::Drop, "{code:?}");
        }
        // RESOURCE_EXHAUSTED only with RetryInfo, whose delay is honoured.
        assert_eq!(
            classify_grpc(Code::ResourceExhausted, None),
            Disposition::Drop
        );
        let delay = Some(Duration::from_secs(3));
        assert_eq!(
            classify_grpc(Code::ResourceExhausted, Some(delay)),
            Disposition::Retry { after: delay }
        );
        assert_eq!(classify_grpc(Code::ResourceExhausted, Some(None)), retry);
        assert_eq!(
            classify_grpc(Code::Unavailable, Some(delay)),
            Disposition::Retry { after: delay }
        );
    }

    #[test]
    fn http_statuses_retryable_as_the_spec_says() {
        for status in [429, 502, 503, 504] {
            assert_eq!(
                classify_http(status, None),
                Disposition::Retry { after: None }
            );
        }
        for status in [400, 401, 403, 404, 413, 500, 501] {
            assert_eq!(classify_http(status, Some("5")), Disposition::Drop);
        }
        assert_eq!(
            classify_http(503, Some(" 7 ")),
            Disposition::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify_http(429, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Disposition::Retry { after: None }
        );
    }

    #[test]
    fn error_bodies() {
        let status = tonic_types::Status {
            code: 3,
            message: "bad dictionary".into(),
            details: vec![],
        };
        assert_eq!(error_message(&status.encode_to_vec()), "bad dictionary");
        assert_eq!(error_message(b"plain text"), "plain text");
    }

    #[test]
    fn gzip_round_trip() {
        use std::io::Read as _;
        let raw = vec![7u8; 10_000];
        let packed = gzip(&raw);
        assert!(packed.len() < 200);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, raw);
    }
}
