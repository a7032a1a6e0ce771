//! OTLP exporter settings: the command line first, then the standard `OTEL_EXPORTER_OTLP_*`
//! environment variables (signal-specific `…_PROFILES_…` before the generic ones), then
//! defaults. Resolution is pure (the environment is passed in) so it is tested directly.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};

/// The OTLP/HTTP path of the profiles signal (proto v1.10; `/v1/profiles` does not exist yet).
pub const HTTP_PATH: &str = "/v1development/profiles";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC, `ProfilesService/Export`.
    #[value(name = "grpc")]
    Grpc,
    /// OTLP/HTTP with a protobuf body, `POST <endpoint>/v1development/profiles`.
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    Gzip,
    None,
}

/// How failed requests are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff; each retry doubles it, up to `max_backoff`, with ±50 % jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A request still failing this long after its first attempt is dropped.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(300),
        }
    }
}

/// What the command line said; `None` where it said nothing.
#[derive(Debug, Clone)]
pub struct OtlpArgs {
    pub endpoint: Option<String>,
    pub protocol: Option<Protocol>,
    /// `key=value`, repeatable.
    pub headers: Vec<String>,
    pub ca_cert: Option<PathBuf>,
    pub timeout: Option<Duration>,
    pub compression: Option<Compression>,
    pub queue_bytes: usize,
    pub max_request_bytes: usize,
    pub shutdown_timeout: Duration,
    pub retry: RetryPolicy,
}

/// Resolved settings of an enabled exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The gRPC target, or the full URL requests are POSTed to.
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    pub ca_cert: Option<PathBuf>,
    pub timeout: Duration,
    pub compression: Compression,
    /// The export queue holds at most this many encoded bytes; the oldest requests go first.
    pub queue_bytes: usize,
    /// Each request stays under this (default gRPC servers refuse more than 4 MiB).
    pub max_request_bytes: usize,
    /// How long shutdown keeps trying to deliver what is queued.
    pub shutdown_timeout: Duration,
    pub retry: RetryPolicy,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl OtlpConfig {
    /// The exporter's settings, or None when no endpoint is configured anywhere.
    pub fn resolve(
        args: &OtlpArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        // Signal-specific variable first, then the generic one; empty counts as unset.
        let var = |suffix: &str| {
            [
                format!("OTEL_EXPORTER_OTLP_PROFILES_{suffix}"),
                format!("OTEL_EXPORTER_OTLP_{suffix}"),
            ]
            .into_iter()
            .find_map(|name| {
                env(&name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (name, v))
            })
        };
        let protocol = match (args.protocol, var("PROTOCOL")) {
            (Some(p), _) => p,
            (None, Some((name, value))) => parse_protocol(&value).with_context(|| name)?,
            (None, None) => Protocol::Grpc,
        };
        let endpoint = match (&args.endpoint, var("ENDPOINT")) {
            (Some(e), _) => endpoint_url(e, protocol, false)?,
            (None, Some((name, value))) => {
                let generic = !name.contains("_PROFILES_");
                endpoint_url(&value, protocol, generic).with_context(|| name)?
            }
            (None, None) => return Ok(None),
        };
        let mut headers = match var("HEADERS") {
            Some((name, value)) => parse_header_list(&value).with_context(|| name)?,
            None => Vec::new(),
        };
        for header in &args.headers {
            let (key, value) = parse_header(header)?;
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
            headers.push((key, value));
        }
        let timeout = match (args.timeout, var("TIMEOUT")) {
            (Some(t), _) => t,
            (None, Some((name, value))) => {
                let ms: u64 = value
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}={value}: milliseconds expected"))?;
                Duration::from_millis(ms)
            }
            (None, None) => DEFAULT_TIMEOUT,
        };
        let compression = match (args.compression, var("COMPRESSION")) {
            (Some(c), _) => c,
            (None, Some((name, value))) => match value.trim() {
                "gzip" => Compression::Gzip,
                "none" => Compression::None,
                other => bail!("{name}={other}: gzip or none expected"),
            },
            (None, None) => Compression::Gzip,
        };
        let ca_cert = args
            .ca_cert
            .clone()
            .or_else(|| var("CERTIFICATE").map(|(_, v)| PathBuf::from(v)));
        if args.queue_bytes == 0 || args.max_request_bytes < 1024 {
            bail!("the OTLP queue must hold bytes, and requests need at least 1 KiB");
        }
        Ok(Some(Self {
            endpoint,
            protocol,
            headers,
            ca_cert,
            timeout,
            compression,
            queue_bytes: args.queue_bytes,
            max_request_bytes: args.max_request_bytes,
            shutdown_timeout: args.shutdown_timeout,
            retry: args.retry,
        }))
    }
}

fn parse_protocol(value: &str) -> anyhow::Result<Protocol> {
    match value.trim() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        other => bail!("unsupported OTLP protocol {other:?} (grpc or http/protobuf)"),
    }
}

/// The URL to use. For HTTP, a generic endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`) is a base URL
/// the signal's path is appended to, as the specification says; a specific one (the flag,
/// `…_PROFILES_ENDPOINT`) is used as given, except that a URL without a path gets the path
/// too (POSTing profiles to `/` is never what is meant).
fn endpoint_url(value: &str, protocol: Protocol, generic: bool) -> anyhow::Result<String> {
    let value = value.trim();
    let Some((scheme, rest)) = value.split_once("://") else {
        bail!("OTLP endpoint {value:?} needs a scheme: http:// or https://");
    };
    if scheme != "http" && scheme != "https" {
        bail!("OTLP endpoint {value:?}: http:// or https:// expected");
    }
    if protocol == Protocol::Grpc {
        return Ok(value.to_owned());
    }
    let has_path = rest.find('/').is_some_and(|i| rest[i..] != *"/");
    if generic || !has_path {
        Ok(format!("{}{HTTP_PATH}", value.trim_end_matches('/')))
    } else {
        Ok(value.to_owned())
    }
}

/// `key=value`.
fn parse_header(text: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = text
        .split_once('=')
        .with_context(|| format!("OTLP header {text:?}: key=value expected"))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("OTLP header {text:?}: empty key");
    }
    Ok((key.to_owned(), value.trim().to_owned()))
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key1=value1,key2=value2`, values percent-encoded.
fn parse_header_list(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    text.split(',')
        .filter(|h| !h.trim().is_empty())
        .map(|h| {
            let (key, value) = parse_header(h)?;
            Ok((key, percent_decode(&value)))
        })
        .collect()
}

/// `%XX` sequences decoded (invalid ones kept as they are), UTF-8 read lossily.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn args() -> OtlpArgs {
        OtlpArgs {
            endpoint: None,
            protocol: None,
            headers: Vec::new(),
            ca_cert: None,
            timeout: None,
            compression: None,
            queue_bytes: 1 << 20,
            max_request_bytes: 4 << 20,
            shutdown_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }

    fn resolve(args: &OtlpArgs, env: &[(&str, &str)]) -> anyhow::Result<Option<OtlpConfig>> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::resolve(args, &|name| env.get(name).cloned())
    }

    #[test]
    fn disabled_without_an_endpoint() {
        assert_eq!(resolve(&args(), &[]).unwrap(), None);
        assert_eq!(
            resolve(&args(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap(),
            None
        );
    }

    #[test]
    fn flags_win_over_the_environment() {
        let mut a = args();
        a.endpoint = Some("http://flag:4318".into());
        a.protocol = Some(Protocol::HttpProtobuf);
        a.headers = vec!["Authorization=Bearer flag".into()];
        a.timeout = Some(Duration::from_secs(2));
        a.compression = Some(Compression::None);
        let c = resolve(
            &a,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "authorization=env,x-tenant=a%20b",
                ),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://flag:4318/v1development/profiles");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            c.headers,
            vec![
                ("x-tenant".to_owned(), "a b".to_owned()),
                ("Authorization".to_owned(), "Bearer flag".to_owned()),
            ]
        );
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.compression, Compression::None);
    }

    #[test]
    fn environment_defaults() {
        let c = resolve(
            &args(),
            &[
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "https://collector:4318/base/",
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
            ],
        )
        .unwrap()
        .unwrap();
        // Generic endpoint: a base URL, the signal path appended.
        assert_eq!(
            c.endpoint,
            "https://collector:4318/base/v1development/profiles"
        );
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.ca_cert, Some(PathBuf::from("/etc/ca.pem")));
        // Signal-specific endpoint: as given.
        let c = resolve(
            &args(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
                (
                    "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT",
                    "http://specific:9999/custom",
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://specific:9999/custom");
        // gRPC: the target as given, default protocol.
        let c = resolve(&args(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.protocol),
            ("http://c:4317", Protocol::Grpc)
        );
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn bad_values_are_errors() {
        let with = |k, v| {
            resolve(
                &args(),
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:1"), (k, v)],
            )
        };
        assert!(with("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json").is_err());
        assert!(with("OTEL_EXPORTER_OTLP_TIMEOUT", "10s").is_err());
        assert!(with("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd").is_err());
        assert!(with("OTEL_EXPORTER_OTLP_HEADERS", "novalue").is_err());
        let mut a = args();
        a.endpoint = Some("collector:4317".into());
        assert!(resolve(&a, &[]).is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("Basic%20abc%3D%3D"), "Basic abc==");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
