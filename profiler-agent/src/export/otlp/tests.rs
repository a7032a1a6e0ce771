//! The delivery path end to end against in-process receivers: the generated tonic server for
//! gRPC and a minimal HTTP/1.1 responder, each answering from a script.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::profiles::v1development::{
        ExportProfilesPartialSuccess, ExportProfilesServiceRequest, ExportProfilesServiceResponse,
        profiles_service_server::{ProfilesService, ProfilesServiceServer},
    },
    profiles::v1development::{ProfilesDictionary, ResourceProfiles},
};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{Code, Request, Response, Status, codec::CompressionEncoding};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::{config::*, queue::Exporter, transport::Transport};
use crate::metrics::Metrics;

fn config(endpoint: String, protocol: Protocol) -> OtlpConfig {
    OtlpConfig {
        endpoint,
        protocol,
        headers: vec![("authorization".into(), "Bearer secret".into())],
        ca_cert: None,
        timeout: Duration::from_secs(5),
        compression: Compression::Gzip,
        queue_bytes: 1 << 20,
        max_request_bytes: 4 << 20,
        shutdown_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_elapsed: Duration::from_secs(10),
        },
    }
}

fn request() -> (ExportProfilesServiceRequest, Bytes) {
    let request = ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles::default()],
        dictionary: Some(ProfilesDictionary {
            string_table: vec![String::new(), "burn".into()],
            ..Default::default()
        }),
    };
    let body = Bytes::from(request.encode_to_vec());
    (request, body)
}

fn partial(rejected: i64) -> ExportProfilesServiceResponse {
    ExportProfilesServiceResponse {
        partial_success: Some(ExportProfilesPartialSuccess {
            rejected_profiles: rejected,
            error_message: "some profiles were rejected".into(),
        }),
    }
}

/// Waits (5 s at most) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a receiver saw.
#[derive(Default)]
struct Seen {
    requests: Vec<ExportProfilesServiceRequest>,
    authorization: Vec<String>,
}

#[derive(Clone, Default)]
struct GrpcReceiver {
    script: Arc<Mutex<VecDeque<Result<ExportProfilesServiceResponse, Status>>>>,
    seen: Arc<Mutex<Seen>>,
}

#[tonic::async_trait]
impl ProfilesService for GrpcReceiver {
    async fn export(
        &self,
        request: Request<ExportProfilesServiceRequest>,
    ) -> Result<Response<ExportProfilesServiceResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        {
            let mut seen = self.seen.lock().unwrap();
            seen.authorization.push(auth);
            seen.requests.push(request.into_inner());
        }
        let next = self.script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| Ok(ExportProfilesServiceResponse::default()))
            .map(Response::new)
    }
}

async fn grpc_receiver(
    script: Vec<Result<ExportProfilesServiceResponse, Status>>,
) -> (GrpcReceiver, SocketAddr) {
    let receiver = GrpcReceiver {
        script: Arc::new(Mutex::new(script.into())),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service =
        ProfilesServiceServer::new(receiver.clone()).accept_compressed(CompressionEncoding::Gzip);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (receiver, addr)
}

fn retry_info(delay: Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        "slow down",
        ErrorDetails::with_retry_info(Some(delay)),
    )
}

#[tokio::test]
async fn grpc_retries_transient_failures_then_counts_the_partial_success() {
    let (receiver, addr) = grpc_receiver(vec![
        Err(Status::unavailable("starting")),
        Err(retry_info(Duration::from_millis(20))),
        Ok(partial(2)),
    ])
    .await;
    let metrics = Metrics::default();
    let c = config(format!("http://{addr}"), Protocol::Grpc);
    let (exporter, queue) = Exporter::spawn(
        Transport::new(&c).unwrap(),
        c.retry,
        c.queue_bytes,
        metrics.clone(),
    );
    let (sent, body) = request();
    queue.push(body, 7);
    until("the export", || metrics.get("otlp_requests_exported") == 1).await;
    exporter.shutdown(Duration::from_secs(1)).await;
    let seen = receiver.seen.lock().unwrap();
    assert_eq!(seen.requests.len(), 3);
    assert!(seen.requests.iter().all(|r| *r == sent));
    assert!(seen.authorization.iter().all(|a| a == "Bearer secret"));
    assert_eq!(metrics.get("otlp_export_retries"), 2);
    assert_eq!(metrics.get("otlp_export_attempts_failed"), 2);
    assert_eq!(metrics.get("otlp_samples_exported"), 7);
    assert_eq!(metrics.get("otlp_partial_success_responses"), 1);
    assert_eq!(metrics.get("otlp_profiles_rejected"), 2);
    assert_eq!(metrics.get("otlp_queue_bytes"), 0);
}

#[tokio::test]
async fn grpc_permanent_failures_are_dropped_not_retried() {
    let (receiver, addr) = grpc_receiver(vec![
        Err(Status::invalid_argument("bad dictionary")),
        // RESOURCE_EXHAUSTED without RetryInfo is not retryable.
        Err(Status::resource_exhausted("too big")),
    ])
    .await;
    let metrics = Metrics::default();
    let c = config(format!("http://{addr}"), Protocol::Grpc);
    let (exporter, queue) = Exporter::spawn(
        Transport::new(&c).unwrap(),
        c.retry,
        c.queue_bytes,
        metrics.clone(),
    );
    queue.push(request().1, 1);
    queue.push(request().1, 1);
    until("both failures", || {
        metrics.get("otlp_requests_dropped_permanent_error") == 2
    })
    .await;
    exporter.shutdown(Duration::from_secs(1)).await;
    assert_eq!(receiver.seen.lock().unwrap().requests.len(), 2);
    assert_eq!(metrics.get("otlp_export_retries"), 0);
    assert_eq!(metrics.get("otlp_requests_exported"), 0);
}

/// A canned HTTP response.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

#[derive(Default)]
struct HttpSeen {
    paths: Vec<String>,
    headers: Vec<String>,
    bodies: Vec<Vec<u8>>,
}

/// Serves one request per connection from `script` (then 200 with an empty body).
async fn http_receiver(script: Vec<Reply>) -> (Arc<Mutex<HttpSeen>>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(HttpSeen::default()));
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let (head, body) = loop {
                let n = socket.read(&mut buf).await.unwrap();
                data.extend_from_slice(&buf[..n]);
                let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                while data.len() < end + 4 + length {
                    let n = socket.read(&mut buf).await.unwrap();
                    data.extend_from_slice(&buf[..n]);
                }
                break (head, data[end + 4..end + 4 + length].to_vec());
            };
            {
                let mut seen = record.lock().unwrap();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                seen.paths.push(path);
                seen.headers.push(head);
                seen.bodies.push(body);
            }
            let reply = script.lock().unwrap().pop_front().unwrap_or(Reply {
                status: 200,
                headers: vec![],
                body: vec![],
            });
            let mut out = format!(
                "HTTP/1.1 {} X\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nconnection: close\r\n",
                reply.status,
                reply.body.len()
            );
            for (k, v) in &reply.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            socket.write_all(out.as_bytes()).await.unwrap();
            socket.write_all(&reply.body).await.unwrap();
            let _ = socket.shutdown().await;
        }
    });
    (seen, addr)
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn http_honours_retry_after_and_reports_partial_success() {
    let (seen, addr) = http_receiver(vec![
        Reply {
            status: 503,
            headers: vec![("retry-after", "0".into())],
            body: b"busy".to_vec(),
        },
        Reply {
            status: 429,
            headers: vec![],
            body: vec![],
        },
        Reply {
            status: 200,
            headers: vec![],
            body: partial(1).encode_to_vec(),
        },
        Reply {
            status: 400,
            headers: vec![],
            body: b"malformed".to_vec(),
        },
    ])
    .await;
    let metrics = Metrics::default();
    // As from the flag: the path is appended to a bare URL.
    let args = OtlpArgs {
        endpoint: Some(format!("http://{addr}")),
        protocol: Some(Protocol::HttpProtobuf),
        headers: vec!["authorization=Bearer secret".into()],
        ca_cert: None,
        timeout: None,
        compression: None,
        queue_bytes: 1 << 20,
        max_request_bytes: 4 << 20,
        shutdown_timeout: Duration::from_secs(1),
        retry: config(String::new(), Protocol::Grpc).retry,
    };
    let c = OtlpConfig::resolve(&args, &|_| None).unwrap().unwrap();
    let (exporter, queue) = Exporter::spawn(
        Transport::new(&c).unwrap(),
        c.retry,
        c.queue_bytes,
        metrics.clone(),
    );
    let (sent, body) = request();
    queue.push(body.clone(), 3);
    until("the export", || metrics.get("otlp_requests_exported") == 1).await;
    queue.push(body, 3);
    until("the permanent failure", || {
        metrics.get("otlp_requests_dropped_permanent_error") == 1
    })
    .await;
    exporter.shutdown(Duration::from_secs(1)).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.paths, vec!["/v1development/profiles"; 4]);
    for (head, body) in seen.headers.iter().zip(&seen.bodies) {
        assert!(head.contains("content-encoding: gzip"), "{head}");
        assert!(
            head.contains("content-type: application/x-protobuf"),
            "{head}"
        );
        assert!(head.contains("authorization: bearer secret"), "{head}");
        assert_eq!(
            ExportProfilesServiceRequest::decode(gunzip(body).as_slice()).unwrap(),
            sent
        );
    }
    assert_eq!(metrics.get("otlp_export_retries"), 2);
    assert_eq!(metrics.get("otlp_profiles_rejected"), 1);
    assert_eq!(
        metrics.get("otlp_wire_bytes_exported"),
        seen.bodies[2].len() as u64
    );
}

#[tokio::test]
async fn receiver_down_drops_the_oldest_and_shutdown_keeps_its_deadline() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let metrics = Metrics::default();
        let mut c = config(format!("http://127.0.0.1:{port}"), protocol);
        c.endpoint = match protocol {
            Protocol::Grpc => c.endpoint,
            Protocol::HttpProtobuf => format!("{}/v1development/profiles", c.endpoint),
        };
        let cap = 250;
        let (exporter, queue) =
            Exporter::spawn(Transport::new(&c).unwrap(), c.retry, cap, metrics.clone());
        // A valid request of exactly 100 bytes (gRPC decodes it before sending).
        let body = Bytes::from(
            ExportProfilesServiceRequest {
                resource_profiles: vec![],
                dictionary: Some(ProfilesDictionary {
                    string_table: vec!["x".repeat(96)],
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
        );
        assert_eq!(body.len(), 100);
        for _ in 0..5 {
            queue.push(body.clone(), 10);
            assert!(queue.queued_bytes() <= cap);
        }
        until("retries", || metrics.get("otlp_export_retries") >= 2).await;
        let started = Instant::now();
        exporter.shutdown(Duration::from_millis(300)).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{protocol:?}: shutdown took {took:?}"
        );
        assert_eq!(metrics.get("otlp_requests_dropped_queue_full"), 3);
        assert_eq!(metrics.get("otlp_samples_dropped_queue_full"), 30);
        assert_eq!(metrics.get("otlp_requests_dropped_shutdown"), 2);
        assert_eq!(metrics.get("otlp_queue_bytes_peak"), 200);
        assert_eq!(metrics.get("otlp_queue_bytes"), 0);
        assert_eq!(metrics.get("otlp_requests_exported"), 0);
    }
}

/// A CA, and a certificate for 127.0.0.1 it signed: (CA PEM, certificate PEM, key PEM).
fn test_pki() -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn grpc_over_tls_trusts_the_custom_ca() {
    let (ca, cert, key) = test_pki();
    let receiver = GrpcReceiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(
                ProfilesServiceServer::new(receiver.clone())
                    .accept_compressed(CompressionEncoding::Gzip),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let ca_path = std::env::temp_dir().join(format!("otlp-test-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_path, ca).unwrap();
    for trusted in [false, true] {
        let metrics = Metrics::default();
        let mut c = config(format!("https://{addr}"), Protocol::Grpc);
        c.ca_cert = trusted.then(|| ca_path.clone());
        let (exporter, queue) = Exporter::spawn(
            Transport::new(&c).unwrap(),
            c.retry,
            c.queue_bytes,
            metrics.clone(),
        );
        queue.push(request().1, 1);
        if trusted {
            until("the export over TLS", || {
                metrics.get("otlp_requests_exported") == 1
            })
            .await;
        } else {
            // Only the system's roots: the handshake fails, and that is worth retrying.
            until("a failed handshake", || {
                metrics.get("otlp_export_attempts_failed") >= 1
            })
            .await;
            assert_eq!(metrics.get("otlp_requests_exported"), 0);
        }
        exporter.shutdown(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&ca_path);
    assert_eq!(receiver.seen.lock().unwrap().requests.len(), 1);
}
