//! The HTTP API and the HTML page (axum): the only module that knows HTTP. Every store access
//! runs on a blocking thread with its own read-only connection, so a slow query never stalls
//! the runtime the sampler's reader shares. Long answers (trace lists, rendered flame graphs
//! and folded stacks) are streamed in chunks as they are produced.
//!
//! Routes (all but `/healthz` need the bearer token when one is configured; `?access_token=`
//! works too, for a browser):
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | HTML: recent traces, services, a box to paste a trace id |
//! | `GET /trace?id=` | redirect to `/traces/{id}` |
//! | `GET /traces/{id}` | HTML: the trace's summary, top functions and flame graph |
//! | `GET /api/traces?service=&pid=&span_id=&since=&limit=` | JSON list, most recent first |
//! | `GET /api/traces/{id}` | JSON: index row, processes, span ids |
//! | `GET /api/traces/{id}/profile.pb.gz`, `/folded`, `/flamegraph.svg`, `/top` | the trace |
//! | `GET /api/window/{profile.pb.gz,folded,flamegraph.svg,top}?service=&pid=&from=&to=&since=&duration=` | a time window |
//! | `GET /api/services?since=` | JSON: services in the buckets |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | `ok` |
//!
//! Errors: a malformed trace id or parameter is 400 with a message, an unknown trace (or an
//! empty window) 404, a locked store 503, anything else 500.

mod body;
mod html;
mod prometheus;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::SystemTime};

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use serde::Deserialize;
use tokio::sync::watch;

use crate::{
    ebpf::KernelCounters,
    export::pprof,
    metrics::Metrics,
    query::{
        View, format_time, parse_span_id, parse_trace_id, resolve_window, trace_title, unix_ns,
        window_title, write_view,
    },
    store::{StoreError, StoreReader, TraceFilter, Window},
};

/// Largest `limit` a trace list takes.
const MAX_LIST: usize = 10_000;
/// Rows of the top-functions views.
const TOP_ROWS: usize = 50;

/// What the API serves from.
#[derive(Clone)]
pub struct ApiState {
    /// The store (None: the store is off; its routes answer 503).
    pub store: Option<PathBuf>,
    pub token: Option<String>,
    pub metrics: Metrics,
    /// The latest kernel counters, published by the daemon's loop (which owns the sampler).
    pub kernel: watch::Receiver<KernelCounters>,
}

/// Binds the listener (before the sampler starts, so a taken port fails early).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--api-listen): {e}"))
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

pub fn router(state: ApiState) -> Router {
    let state = Arc::new(state);
    let guarded = Router::new()
        .route("/", get(index))
        .route("/trace", get(trace_search))
        .route("/traces/{id}", get(trace_page))
        .route("/api/traces", get(list_traces))
        .route("/api/traces/{id}", get(trace_summary))
        .route("/api/traces/{id}/{view}", get(trace_view))
        .route("/api/window/{view}", get(window_view))
        .route("/api/services", get(services))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    guarded
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

type AppState = State<Arc<ApiState>>;

/// An error answer: status and a one-line message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, format!("{}\n", self.1)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::TraceNotFound(_) | StoreError::NoSamples(_) => StatusCode::NOT_FOUND,
            StoreError::Locked { .. } | StoreError::Missing(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs `f` with a fresh read-only connection on a blocking thread.
async fn with_reader<T: Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&StoreReader) -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    let Some(path) = state.store.clone() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store is off (run without --no-store)".into(),
        ));
    };
    tokio::task::spawn_blocking(move || f(&StoreReader::open(&path)?))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("query task: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

#[derive(Deserialize, Default)]
struct TokenQuery {
    access_token: Option<String>,
}

/// Bearer token check (constant-time comparison), when a token is configured.
async fn authorize(
    State(state): AppState,
    Query(query): Query<TokenQuery>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = header.or(query.access_token.as_deref());
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        next.run(request).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token>, or ?access_token=)"
                .into(),
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `?access_token=` to append to links when the page was opened with one.
fn token_suffix(state: &ApiState, query: &TokenQuery) -> String {
    match (&state.token, &query.access_token) {
        (Some(_), Some(t)) => format!("?access_token={}", html::url_encode(t)),
        _ => String::new(),
    }
}

fn trace_id(text: &str) -> ApiResult<[u8; 16]> {
    parse_trace_id(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn since_ns(since: Option<&str>) -> ApiResult<Option<u64>> {
    since
        .map(|s| {
            humantime::parse_duration(s)
                .map(|d| unix_ns(SystemTime::now()).saturating_sub(d.as_nanos() as u64))
                .map_err(|e| ApiError::bad_request(format!("since={s:?}: {e} (e.g. 10m, 2h)")))
        })
        .transpose()
}

#[derive(Deserialize)]
struct ListQuery {
    service: Option<String>,
    pid: Option<u32>,
    namespace: Option<String>,
    pod: Option<String>,
    span_id: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
}

impl ListQuery {
    fn filter(&self) -> ApiResult<TraceFilter> {
        Ok(TraceFilter {
            service: self.service.clone().filter(|s| !s.is_empty()),
            pid: self.pid,
            namespace: self.namespace.clone().filter(|s| !s.is_empty()),
            pod: self.pod.clone().filter(|s| !s.is_empty()),
            span_id: self
                .span_id
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(parse_span_id)
                .transpose()
                .map_err(ApiError::bad_request)?,
            since_ns: since_ns(self.since.as_deref().filter(|s| !s.is_empty()))?,
            limit: self.limit.unwrap_or(100).min(MAX_LIST),
        })
    }
}

/// `GET /api/traces`: a JSON array, streamed row by row.
async fn list_traces(State(state): AppState, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    let filter = q.filter()?;
    let path = state.store.clone();
    // Open first, so that a missing or locked store is an error status, not a cut stream.
    with_reader(&state, |_| Ok(())).await?;
    Ok(body::stream("application/json", move |w| {
        let Some(path) = path else { return Ok(()) };
        let reader = StoreReader::open(&path).map_err(std::io::Error::other)?;
        w.write_all(b"[")?;
        let mut first = true;
        let mut result = Ok(());
        reader
            .for_each_trace(&filter, |t| {
                let sep: &[u8] = if first { b"\n" } else { b",\n" };
                first = false;
                result = w
                    .write_all(sep)
                    .and_then(|()| serde_json::to_writer(&mut *w, &t).map_err(Into::into));
                result.is_ok()
            })
            .map_err(std::io::Error::other)?;
        result?;
        w.write_all(b"\n]\n")
    }))
}

/// `GET /api/traces/{id}`.
async fn trace_summary(State(state): AppState, Path(id): Path<String>) -> ApiResult<Response> {
    let id = trace_id(&id)?;
    let (trace, (processes, spans)) =
        with_reader(&state, move |r| Ok((r.trace(&id)?, r.trace_detail(&id)?))).await?;
    Ok(Json(serde_json::json!({
        "trace": trace,
        "processes": processes,
        "span_ids": spans,
    }))
    .into_response())
}

fn view_of(name: &str) -> ApiResult<(View, &'static str)> {
    Ok(match name {
        "profile.pb.gz" => (View::Pprof, "application/octet-stream"),
        "folded" => (View::Folded, "text/plain; charset=utf-8"),
        "flamegraph.svg" => (View::Svg, "image/svg+xml"),
        "top" => (View::Top, "text/plain; charset=utf-8"),
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no view {other:?}: profile.pb.gz, folded, flamegraph.svg or top"),
            ));
        }
    })
}

/// `GET /api/traces/{id}/{view}`.
async fn trace_view(
    State(state): AppState,
    Path((id, view)): Path<(String, String)>,
) -> ApiResult<Response> {
    let id = trace_id(&id)?;
    let (view, content_type) = view_of(&view)?;
    let (trace, raw) =
        with_reader(&state, move |r| Ok((r.trace(&id)?, r.trace_pprof(&id)?))).await?;
    let title = trace_title(&trace);
    let filename = format!("{}.pb.gz", trace.trace_id_hex());
    let mut response = render(view, content_type, raw, title);
    if view == View::Pprof {
        attach(&mut response, &filename);
    }
    Ok(response)
}

#[derive(Deserialize)]
struct WindowQuery {
    service: Option<String>,
    pid: Option<u32>,
    namespace: Option<String>,
    pod: Option<String>,
    from: Option<String>,
    to: Option<String>,
    since: Option<String>,
    duration: Option<String>,
}

/// `GET /api/window/{view}`.
async fn window_view(
    State(state): AppState,
    Path(view): Path<String>,
    Query(q): Query<WindowQuery>,
) -> ApiResult<Response> {
    let (view, content_type) = view_of(&view)?;
    let duration = |s: Option<&str>, name: &str| {
        s.filter(|s| !s.is_empty())
            .map(humantime::parse_duration)
            .transpose()
            .map_err(|e| ApiError::bad_request(format!("{name}: {e} (e.g. 1m, 10m)")))
    };
    let (from_ns, to_ns) = resolve_window(
        q.from.as_deref().filter(|s| !s.is_empty()),
        q.to.as_deref().filter(|s| !s.is_empty()),
        duration(q.since.as_deref(), "since")?,
        duration(q.duration.as_deref(), "duration")?,
        SystemTime::now(),
    )
    .map_err(ApiError::bad_request)?;
    let window = Window {
        service: q.service.filter(|s| !s.is_empty()),
        pid: q.pid,
        namespace: q.namespace.filter(|s| !s.is_empty()),
        pod: q.pod.filter(|s| !s.is_empty()),
        from_ns,
        to_ns,
    };
    let (profile, title) = with_reader(&state, move |r| {
        let (profile, covered) = r.window_profile(&window)?;
        Ok((profile, window_title(&window, covered)))
    })
    .await?;
    let mut response = render(view, content_type, pprof::encode_gzip(&profile), title);
    if view == View::Pprof {
        attach(&mut response, "window.pb.gz");
    }
    Ok(response)
}

/// Streams `view` of the stored pprof `raw` (gzip or not), rendered on a blocking thread.
fn render(view: View, content_type: &'static str, raw: Vec<u8>, title: String) -> Response {
    if view == View::Pprof {
        let file = pprof::ensure_gzip(&raw).into_owned();
        return ([(header::CONTENT_TYPE, content_type)], file).into_response();
    }
    body::stream(content_type, move |w| {
        let profile = pprof::decode(&raw).map_err(std::io::Error::other)?;
        write_view(view, &profile, None, &title, TOP_ROWS, w)
    })
}

fn attach(response: &mut Response, filename: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, v);
    }
}

#[derive(Deserialize)]
struct ServicesQuery {
    since: Option<String>,
}

/// `GET /api/services`.
async fn services(State(state): AppState, Query(q): Query<ServicesQuery>) -> ApiResult<Response> {
    let since = since_ns(Some(q.since.as_deref().unwrap_or("1h")))?.unwrap_or(0);
    let rows = with_reader(&state, move |r| r.services(since)).await?;
    Ok(Json(rows).into_response())
}

/// `GET /metrics`.
async fn metrics(State(state): AppState) -> Response {
    let stats = match &state.store {
        Some(_) => with_reader(&state, |r| r.stats()).await.ok(),
        None => None,
    };
    let kernel = state.kernel.borrow().clone();
    let text = prometheus::render(&state.metrics.snapshot(), &kernel, stats.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Deserialize)]
struct IndexQuery {
    service: Option<String>,
    access_token: Option<String>,
}

/// `GET /`: the HTML page.
async fn index(State(state): AppState, Query(q): Query<IndexQuery>) -> ApiResult<Response> {
    let suffix = token_suffix(
        &state,
        &TokenQuery {
            access_token: q.access_token.clone(),
        },
    );
    let filter = TraceFilter {
        service: q.service.clone().filter(|s| !s.is_empty()),
        limit: 100,
        ..TraceFilter::default()
    };
    let since = unix_ns(SystemTime::now()).saturating_sub(3_600_000_000_000);
    let (traces, services) = with_reader(&state, move |r| {
        Ok((r.traces(&filter)?, r.services(since)?))
    })
    .await?;
    Ok(html::page(
        "profiler: traces",
        &html::index(&traces, &services, q.service.as_deref(), &suffix),
    ))
}

#[derive(Deserialize)]
struct SearchQuery {
    id: Option<String>,
    access_token: Option<String>,
}

/// `GET /trace?id=`: the search box's target.
async fn trace_search(State(state): AppState, Query(q): Query<SearchQuery>) -> ApiResult<Redirect> {
    let id = trace_id(q.id.as_deref().unwrap_or(""))?;
    let suffix = token_suffix(
        &state,
        &TokenQuery {
            access_token: q.access_token,
        },
    );
    Ok(Redirect::to(&format!(
        "/traces/{}{suffix}",
        crate::context::hex(&id)
    )))
}

/// `GET /traces/{id}`: one trace's page.
async fn trace_page(
    State(state): AppState,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> ApiResult<Response> {
    let id = trace_id(&id)?;
    let suffix = token_suffix(&state, &q);
    let (trace, (processes, spans), profile) = with_reader(&state, move |r| {
        Ok((r.trace(&id)?, r.trace_detail(&id)?, r.trace_profile(&id)?))
    })
    .await?;
    let top = crate::export::render::Stacks::of(&profile).top().limit(30);
    Ok(html::page(
        &format!("trace {}", trace.trace_id_hex()),
        &html::trace(&trace, &processes, &spans, &top, &suffix),
    ))
}

/// Where to look, as the daemon prints it at start.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

/// The time now, formatted (for the page footer).
fn now_text() -> String {
    format_time(unix_ns(SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use crate::{
        export::synthetic,
        store::{Store, TraceBatch, TraceProcess, TraceRecord},
    };

    /// A store with one synthetic trace (`ab..ab`), served on an ephemeral port.
    async fn serve_store(dir: &std::path::Path, token: Option<&str>) -> SocketAddr {
        let db = dir.join("api.db");
        let mut store = Store::open(&db).unwrap();
        let id = [0xab; 16];
        let profile = synthetic::trace_profile(id, 1_000, 1);
        let trace = TraceBatch::from_profiles([(
            TraceRecord {
                trace_id: id,
                part: 1,
                first_ns: 1_000,
                last_ns: 2_000,
                samples: u64::from(synthetic::SAMPLES),
                cpu_ns: 1,
                processes: vec![TraceProcess {
                    pid: 1,
                    process_name: "checkout".into(),
                    service: "checkout".into(),
                    namespace: "shop".into(),
                    pod: "checkout-5d8c-q2".into(),
                }],
                spans: vec![[1; 8]],
                index: 0,
            },
            profile,
        )]);
        store.write(&trace, &[]).unwrap();
        drop(store);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = ApiState {
            store: Some(db),
            token: token.map(str::to_owned),
            metrics: Metrics::default(),
            kernel: watch::channel(KernelCounters::default()).1,
        };
        tokio::spawn(serve(listener, state, std::future::pending()));
        addr
    }

    /// A plain HTTP/1.1 GET on a blocking thread: (status, whole response text).
    async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{}\r\n",
            token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"))
        );
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let status = response[9..12].parse().unwrap();
            (status, response)
        })
        .await
        .unwrap()
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("profiler-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_codes_and_messages() {
        let dir = temp_dir("status");
        let addr = serve_store(&dir, None).await;
        let known = "ab".repeat(16);
        let (status, body) = get(addr, &format!("/api/traces/{known}/top"), None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("process_step_"), "{body}");
        let (status, body) = get(addr, "/api/traces/xyz/flamegraph.svg", None).await;
        assert_eq!(status, 400);
        assert!(
            body.contains("a trace id is 32 hex digits; got 3 characters"),
            "{body}"
        );
        let (status, body) = get(addr, &format!("/api/traces/{}/top", "0".repeat(32)), None).await;
        assert_eq!(status, 400);
        assert!(body.contains("all-zero"), "{body}");
        let (status, body) = get(addr, &format!("/api/traces/{}/top", "g".repeat(32)), None).await;
        assert_eq!(status, 400);
        assert!(body.contains("not hex"), "{body}");
        let (status, body) = get(addr, &format!("/trace?id={}", "1".repeat(31)), None).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = get(addr, &format!("/api/traces/{}/top", "cd".repeat(16)), None).await;
        assert_eq!(status, 404);
        assert!(body.contains("is not in the store"), "{body}");
        let (status, _) = get(addr, &format!("/api/traces/{known}/nonsense"), None).await;
        assert_eq!(status, 404);
        let (status, body) = get(addr, "/api/traces?since=soon", None).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = get(addr, "/api/window/top?from=25:00", None).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = get(addr, "/api/window/top?since=10m", None).await;
        assert_eq!(status, 404, "an empty window: {body}");
        let (status, body) = get(addr, "/api/traces?service=checkout", None).await;
        assert_eq!(status, 200);
        assert!(body.contains(&known), "{body}");
        let (status, body) = get(addr, &format!("/trace?id={}", known.to_uppercase()), None).await;
        assert_eq!(status, 303, "{body}");
        assert!(
            body.contains(&format!("location: /traces/{known}")),
            "{body}"
        );
        let (status, body) = get(addr, "/", None).await;
        assert_eq!(status, 200);
        assert!(body.contains(&known) && body.contains("checkout"), "{body}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bearer_token() {
        let dir = temp_dir("token");
        let addr = serve_store(&dir, Some("t0k3n")).await;
        let (status, body) = get(addr, "/api/traces", None).await;
        assert_eq!(status, 401);
        assert!(
            body.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{body}"
        );
        assert_eq!(get(addr, "/api/traces", Some("t0k3N")).await.0, 401);
        assert_eq!(get(addr, "/api/traces", Some("t0k3n")).await.0, 200);
        assert_eq!(get(addr, "/metrics?access_token=t0k3n", None).await.0, 200);
        assert_eq!(get(addr, "/healthz", None).await.0, 200);
        let (status, body) = get(addr, "/?access_token=t0k3n", None).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("?access_token=t0k3n"),
            "links keep the token: {body}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
