//! A local OTLP/HTTP sink for the bench: accepts `POST /v1development/profiles` on loopback,
//! keeps each request body as sent and answers 200 with an empty body. [`OtlpSink::tally`]
//! then counts the bytes on the wire (gzip) and decodes each request (opentelemetry-proto) to
//! count the sampled ticks in it: what it measures is what the agent sends per sample.
//!
//! The decoding waits for `tally`, which the bench calls once the agent has stopped. The sink
//! runs in the bench's own process, which the agent samples like every other process and
//! symbolizes as it goes: decoding a request in the (unoptimized, DWARF-heavy) xtask binary
//! inside the window could put milliseconds of the agent's first symbolization of xtask's code
//! (a compile unit parsed per new address) into some windows and not others.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use prost::Message as _;

/// What the sink received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OtlpTally {
    pub requests: u64,
    /// Request bodies as sent (gzip).
    pub wire_bytes: u64,
    /// The same bodies uncompressed.
    pub raw_bytes: u64,
    /// Sampled ticks: timestamps (or values, for samples without timestamps).
    pub samples: u64,
}

/// A request body as received, and whether it was sent gzip-compressed.
type Body = (Vec<u8>, bool);

pub(crate) struct OtlpSink {
    pub port: u16,
    bodies: Arc<Mutex<Vec<Body>>>,
}

impl OtlpSink {
    /// Listens on a free loopback port; connections are served on their own threads, which
    /// live as long as the bench (one sink per run of the agent).
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the OTLP sink")?;
        let port = listener.local_addr()?.port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let shared = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let bodies = shared.clone();
                std::thread::spawn(move || {
                    // A broken connection ends that connection only.
                    let _ = serve(stream, &bodies);
                });
            }
        });
        Ok(Self { port, bodies })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Decodes every request received so far: an error names the first that is not an
    /// `ExportProfilesServiceRequest` with a dictionary (the agent sent something a collector
    /// would refuse).
    pub fn tally(&self) -> anyhow::Result<OtlpTally> {
        let bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        let mut tally = OtlpTally::default();
        for (index, (body, gzip)) in bodies.iter().enumerate() {
            let counted = count(body, *gzip).with_context(|| {
                format!(
                    "OTLP request {} of {} ({} bytes, gzip: {gzip})",
                    index + 1,
                    bodies.len(),
                    body.len()
                )
            })?;
            tally.requests += 1;
            tally.wire_bytes += body.len() as u64;
            tally.raw_bytes += counted.raw_bytes;
            tally.samples += counted.samples;
        }
        Ok(tally)
    }
}

/// HTTP/1.1 keep-alive: one request after the other until the client closes.
fn serve(stream: TcpStream, bodies: &Mutex<Vec<Body>>) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let (mut length, mut gzip) = (0usize, false);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse()?,
                "content-encoding" => gzip = value.trim() == "gzip",
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((body, gzip));
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        )?;
        writer.flush()?;
    }
}

/// The uncompressed size and the ticks of one request body.
fn count(body: &[u8], gzip: bool) -> anyhow::Result<OtlpTally> {
    let raw = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body).read_to_end(&mut out)?;
        out
    } else {
        body.to_vec()
    };
    let request = ExportProfilesServiceRequest::decode(raw.as_slice())?;
    if request.dictionary.is_none() {
        bail!("no dictionary");
    }
    let samples = request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .flat_map(|s| &s.profiles)
        .flat_map(|p| &p.samples)
        .map(|s| match s.timestamps_unix_nano.len() {
            0 => s.values.iter().map(|v| *v as u64).sum(),
            n => n as u64,
        })
        .sum();
    Ok(OtlpTally {
        raw_bytes: raw.len() as u64,
        samples,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::profiles::v1development::{
        Profile, ProfilesDictionary, ResourceProfiles, Sample, ScopeProfiles,
    };

    fn post(stream: &mut TcpStream, body: &[u8], gzip: bool) -> String {
        let encoding = if gzip {
            "content-encoding: gzip\r\n"
        } else {
            ""
        };
        write!(
            stream,
            "POST /v1development/profiles HTTP/1.1\r\nhost: x\r\n{encoding}content-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        status
    }

    #[test]
    fn counts_bytes_and_ticks_over_keep_alive() {
        let request = ExportProfilesServiceRequest {
            resource_profiles: vec![ResourceProfiles {
                scope_profiles: vec![ScopeProfiles {
                    profiles: vec![Profile {
                        samples: vec![
                            Sample {
                                timestamps_unix_nano: vec![1, 2, 3],
                                ..Default::default()
                            },
                            Sample {
                                values: vec![4],
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            dictionary: Some(ProfilesDictionary::default()),
        };
        let raw = request.encode_to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&raw).unwrap();
        let packed = gz.finish().unwrap();

        let sink = OtlpSink::start().unwrap();
        let mut stream = TcpStream::connect(("127.0.0.1", sink.port)).unwrap();
        assert!(post(&mut stream, &packed, true).starts_with("HTTP/1.1 200"));
        assert!(post(&mut stream, &raw, false).starts_with("HTTP/1.1 200"));
        assert_eq!(
            sink.tally().unwrap(),
            OtlpTally {
                requests: 2,
                wire_bytes: (packed.len() + raw.len()) as u64,
                raw_bytes: 2 * raw.len() as u64,
                samples: 14,
            }
        );
        // Kept as received, refused when counted: the tally names the request.
        assert!(post(&mut stream, b"garbage", true).starts_with("HTTP/1.1 200"));
        let error = format!("{:#}", sink.tally().unwrap_err());
        assert!(error.contains("OTLP request 3 of 3"), "{error}");
    }
}
