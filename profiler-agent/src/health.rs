//! Health endpoints for the kubelet's probes, on their own listener (the pod IP in
//! Kubernetes) so the agent's API can stay on loopback: `GET /readyz` is 200 once the kernel
//! programs are attached, `GET /healthz` while the daemon keeps making progress (an interval
//! flushed through the collector recently). Plain HTTP/1.1, one request per connection.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// Shared between the daemon (which reports) and the listener (which answers).
pub struct Health {
    start: Instant,
    ready: AtomicBool,
    /// Milliseconds since `start` at the last progress report.
    progress_ms: AtomicU64,
    stale_after: Duration,
}

impl Health {
    /// Healthy while progress is reported at least every `stale_after`.
    pub fn new(stale_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            ready: AtomicBool::new(false),
            progress_ms: AtomicU64::new(0),
            stale_after,
        })
    }

    pub fn set_ready(&self) {
        self.progress();
        self.ready.store(true, Ordering::Release);
    }

    pub fn progress(&self) {
        self.progress_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn is_live(&self) -> bool {
        let last = Duration::from_millis(self.progress_ms.load(Ordering::Acquire));
        self.start.elapsed().saturating_sub(last) <= self.stale_after
    }

    fn answer(&self, path: &str) -> (u16, &'static str) {
        match path {
            "/readyz" if self.is_ready() => (200, "ready\n"),
            "/readyz" => (503, "starting\n"),
            "/healthz" if self.is_live() => (200, "ok\n"),
            "/healthz" => (503, "no progress\n"),
            _ => (404, "not found\n"),
        }
    }
}

/// Answers probes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut len = 0;
            // The request line is all we need; give a slow client 5 s.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = stream.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                std::io::Result::Ok(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.lines().next().unwrap_or("").split_whitespace();
            let (status, body) = match (parts.next(), parts.next()) {
                (Some("GET" | "HEAD"), Some(path)) => health.answer(path),
                _ => (405, "method not allowed\n"),
            };
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                _ => "Service Unavailable",
            };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or("").to_owned()
    }

    #[tokio::test]
    async fn probes_follow_readiness_and_progress() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new(Duration::from_millis(300));
        tokio::spawn(serve(listener, health.clone()));
        assert_eq!(
            get(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(get(addr, "/healthz").await, "HTTP/1.1 200 OK");
        health.set_ready();
        assert_eq!(get(addr, "/readyz").await, "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            get(addr, "/healthz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        health.progress();
        assert_eq!(get(addr, "/healthz").await, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/metrics").await, "HTTP/1.1 404 Not Found");
    }
}
