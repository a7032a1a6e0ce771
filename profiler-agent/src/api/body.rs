//! Streamed response bodies: a producer writes on a blocking thread into an `io::Write` that
//! sends 64 KiB chunks through a small bounded channel, so a large answer is never held in
//! memory whole and a slow client slows the producer down instead of growing a buffer.

use std::{
    io::{self, Write},
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    body::{Body, Bytes},
    http::header,
    response::{IntoResponse as _, Response},
};
use http_body::Frame;
use tokio::sync::mpsc;

const CHUNK: usize = 64 << 10;
/// Chunks in flight at most.
const DEPTH: usize = 4;

/// A response whose body `produce` writes (on a blocking thread). An error after the first
/// byte can only cut the body short; callers check what can fail (lookups) before.
pub fn stream(
    content_type: &'static str,
    produce: impl FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter {
            tx,
            buffer: Vec::with_capacity(CHUNK),
        };
        let result = produce(&mut writer).and_then(|()| writer.flush());
        if let Err(e) = result {
            tracing::warn!(error = %e, "streamed answer failed");
            let _ = writer.tx.blocking_send(Err(e));
        }
    });
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::new(ChannelBody { rx }),
    )
        .into_response()
}

struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buffer: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }
}

struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| c.map(Frame::data)))
    }
}
