//! A local OTLP/HTTP sink for the bench: accepts `POST /v1development/profiles` on loopback,
//! counts the bytes on the wire (gzip), decodes each request (opentelemetry-proto) to count
//! the sampled ticks in it, and answers 200 with an empty body. Nothing else: what it
//! measures is what the agent sends per sample.

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

pub(crate) struct OtlpSink {
    pub port: u16,
    tally: Arc<Mutex<OtlpTally>>,
}

impl OtlpSink {
    /// Listens on a free loopback port; connections are served on their own threads, which
    /// live as long as the bench (one sink per run of the agent).
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the OTLP sink")?;
        let port = listener.local_addr()?.port();
        let tally = Arc::new(Mutex::new(OtlpTally::default()));
        let shared = tally.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tally = shared.clone();
                std::thread::spawn(move || {
                    // A broken connection ends that connection only.
                    let _ = serve(stream, &tally);
                });
            }
        });
        Ok(Self { port, tally })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn tally(&self) -> OtlpTally {
        *self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// HTTP/1.1 keep-alive: one request after the other until the client closes.
fn serve(stream: TcpStream, tally: &Mutex<OtlpTally>) -> anyhow::Result<()> {
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
        let status = match count(&body, gzip) {
            Ok(counted) => {
                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                t.requests += 1;
                t.wire_bytes += body.len() as u64;
                t.raw_bytes += counted.raw_bytes;
                t.samples += counted.samples;
                "200 OK"
            }
            Err(_) => "400 Bad Request",
        };
        write!(
            writer,
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
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
        assert!(post(&mut stream, b"garbage", true).starts_with("HTTP/1.1 400"));
        assert_eq!(
            sink.tally(),
            OtlpTally {
                requests: 2,
                wire_bytes: (packed.len() + raw.len()) as u64,
                raw_bytes: 2 * raw.len() as u64,
                samples: 14,
            }
        );
    }
}
