//! Pod metadata against a local HTTP server that plays the Kubernetes API: it serves the pod
//! list and watch streams of `tests/fixtures/k8s/` (JSON in the API server's shapes, managed
//! fields and all) in the order a real server would, and the owners' GETs:
//!
//! 1. list (version 1000): checkout (ReplicaSet → Deployment), report (Job → CronJob),
//!    node-exporter (DaemonSet, CRI-O ids), debug (no owner, container not created yet);
//! 2. watch from 1000: checkout relabelled, cart added, a bookmark at 1005; the stream ends;
//! 3. watch again from 1005: report deleted, then `ERROR 410 Gone`;
//! 4. list again (2000): debug was deleted meanwhile, search was added (its ReplicaSet lookup
//!    is forbidden: the pod keeps its ReplicaSet as workload);
//! 5. watch from 2000: the server holds the stream open.
//!
//! No real cluster is needed (or available here).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use profiler_agent::{
    k8s::{
        KubernetesOptions,
        cgroup::CgroupIdentity,
        client::{ApiClient, ApiConfig},
        start_pod_metadata,
        watcher::{self, PodIndex, PodMetadataHandle, WatcherConfig},
    },
    metrics::Metrics,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const NODE: &str = "node-a";
const TOKEN: &str = "test-service-account-token";
const CHECKOUT_UID: &str = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const REPORT_UID: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const EXPORTER_UID: &str = "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e";
const DEBUG_UID: &str = "3c4d5e6f-7a8b-4c9d-8e1f-2a3b4c5d6e7f";
const CART_UID: &str = "4d5e6f7a-8b9c-4d0e-9f2a-3b4c5d6e7f80";
const SEARCH_UID: &str = "5e6f7a8b-9c0d-4e1f-8a3b-4c5d6e7f8091";

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A request as the fake API server saw it: its path and its Authorization header.
type Request = (String, Option<String>);

/// Every request the fake API server saw, in order.
#[derive(Default, Clone)]
struct Log(Arc<Mutex<Vec<Request>>>);

impl Log {
    fn paths(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

struct Server {
    addr: std::net::SocketAddr,
    log: Log,
    /// The service-account token the clients read, removed with the server.
    token: tempfile::NamedTempFile,
}

async fn serve() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Log::default();
    let lists = Arc::new(Mutex::new(0));
    let server_log = log.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let log = server_log.clone();
            let lists = lists.clone();
            tokio::spawn(async move { handle(stream, log, lists).await });
        }
    });
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), format!("{TOKEN}\n")).unwrap();
    Server { addr, log, token }
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

async fn respond(stream: &mut TcpStream, status: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
}

/// A watch stream, chunked; each event is split across two chunks (as the network may), the
/// stream ends after the last one.
async fn stream_events(stream: &mut TcpStream, body: &[u8]) {
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    for line in body.split_inclusive(|b| *b == b'\n') {
        let (a, b) = line.split_at(line.len() / 2);
        for part in [a, b] {
            stream
                .write_all(format!("{:x}\r\n", part.len()).as_bytes())
                .await
                .unwrap();
            stream.write_all(part).await.unwrap();
            stream.write_all(b"\r\n").await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
}

async fn handle(mut stream: TcpStream, log: Log, lists: Arc<Mutex<u32>>) {
    let head = read_head(&mut stream).await;
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_owned();
    let auth = lines
        .find_map(|l| {
            l.strip_prefix("authorization: ")
                .or(l.strip_prefix("Authorization: "))
        })
        .map(str::to_owned);
    log.0.lock().unwrap().push((path.clone(), auth));
    let pods = format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}");
    if path == pods {
        let n = {
            let mut n = lists.lock().unwrap();
            *n += 1;
            *n
        };
        let file = if n == 1 {
            "pods-list-1.json"
        } else {
            "pods-list-2.json"
        };
        return respond(&mut stream, "200 OK", &fixture(file)).await;
    }
    if let Some(query) = path.strip_prefix(&format!("{pods}&watch=1&")) {
        let version = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .unwrap_or("");
        match version {
            "1000" => return stream_events(&mut stream, &fixture("watch-1.jsonl")).await,
            "1005" => return stream_events(&mut stream, &fixture("watch-2.jsonl")).await,
            // Nothing more happens: hold the stream open.
            "2000" => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            _ => return respond(&mut stream, "500 Internal Server Error", b"{}").await,
        }
    }
    let (status, body) = match path.as_str() {
        "/apis/apps/v1/namespaces/shop/replicasets/checkout-7d9f8b6c5d" => {
            ("200 OK", fixture("replicaset-checkout.json"))
        }
        "/apis/apps/v1/namespaces/shop/replicasets/cart-5c4f9d7b8" => {
            ("200 OK", fixture("replicaset-cart.json"))
        }
        "/apis/batch/v1/namespaces/batch/jobs/report-28901234" => {
            ("200 OK", fixture("job-report.json"))
        }
        "/apis/apps/v1/namespaces/shop/replicasets/search-6d8f7c9b5" => {
            ("403 Forbidden", fixture("forbidden.json"))
        }
        _ => ("404 Not Found", b"{}".to_vec()),
    };
    respond(&mut stream, status, &body).await
}

fn client(server: &Server) -> ApiClient {
    let mut config = ApiConfig::from_url(&format!("http://{}", server.addr)).unwrap();
    config.token_file = Some(server.token.path().to_owned());
    ApiClient::new(config).unwrap()
}

fn fast_config() -> WatcherConfig {
    WatcherConfig {
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..WatcherConfig::new(NODE)
    }
}

/// Collects snapshots until `done` holds for one (10 s at most).
async fn until(
    handle: &mut PodMetadataHandle,
    seen: &mut Vec<Arc<PodIndex>>,
    done: impl Fn(&PodIndex) -> bool,
) -> Arc<PodIndex> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let current = handle.current();
        if done(&current) {
            return current;
        }
        let changed = tokio::time::timeout_at(deadline, handle.changed()).await;
        assert!(
            matches!(changed, Ok(true)),
            "condition not reached; last snapshot has pods {:?}",
            uids(&current)
        );
        seen.push(handle.current());
    }
}

fn uids(index: &PodIndex) -> Vec<String> {
    let mut v: Vec<String> = index.pods().map(|p| p.name.clone()).collect();
    v.sort();
    v
}

fn workload(index: &PodIndex, uid: &str) -> Option<(String, String)> {
    index
        .by_pod_uid(uid)
        .unwrap_or_else(|| panic!("pod {uid} missing"))
        .workload
        .as_ref()
        .map(|w| (w.kind.clone(), w.name.clone()))
}

fn w(kind: &str, name: &str) -> Option<(String, String)> {
    Some((kind.into(), name.into()))
}

#[tokio::test]
async fn list_watch_reconnect_delete_relist_and_owners() {
    let server = serve().await;
    let metrics = Metrics::default();
    let mut handle = watcher::spawn(client(&server), fast_config(), metrics.clone());
    let mut seen = Vec::new();

    // 1. The first list.
    let first = until(&mut handle, &mut seen, |i| i.synced).await;
    assert_eq!(
        uids(&first),
        [
            "checkout-7d9f8b6c5d-x2x7k",
            "debug",
            "node-exporter-q8w2z",
            "report-28901234-abcde"
        ]
    );
    assert_eq!(workload(&first, CHECKOUT_UID), w("Deployment", "checkout"));
    assert_eq!(workload(&first, REPORT_UID), w("CronJob", "report"));
    assert_eq!(
        workload(&first, EXPORTER_UID),
        w("DaemonSet", "node-exporter")
    );
    assert_eq!(
        workload(&first, DEBUG_UID),
        None,
        "a bare pod has no workload"
    );
    // Containers by id, the runtime scheme stripped (containerd, CRI-O); init containers too.
    let (pod, container) = first.by_container_id(&"a".repeat(64)).unwrap();
    assert_eq!(
        (pod.name.as_str(), container.name.as_str()),
        ("checkout-7d9f8b6c5d-x2x7k", "checkout")
    );
    assert_eq!(
        first.by_container_id(&"c".repeat(64)).unwrap().1.name,
        "migrate"
    );
    assert_eq!(
        first.by_container_id(&"e".repeat(64)).unwrap().0.uid,
        EXPORTER_UID
    );
    let debug = first.by_pod_uid(DEBUG_UID).unwrap();
    assert_eq!(debug.containers.len(), 1);
    assert_eq!(debug.containers[0].id, None, "not created yet");

    // 2. The first watch: relabel and an addition, then the stream ends.
    let after_watch = until(&mut handle, &mut seen, |i| i.by_pod_uid(CART_UID).is_some()).await;
    let checkout = after_watch.by_pod_uid(CHECKOUT_UID).unwrap().clone();
    assert_eq!(
        checkout.labels.get("version").map(String::as_str),
        Some("v2")
    );
    assert_eq!(workload(&after_watch, CART_UID), w("Deployment", "cart"));

    // 3. Reconnected from the bookmark's version: a deletion, then 410 Gone.
    until(&mut handle, &mut seen, |i| {
        i.by_pod_uid(CART_UID).is_some() && i.by_pod_uid(REPORT_UID).is_none()
    })
    .await;

    // 4. Relisted: what happened while disconnected is reflected.
    let last = until(&mut handle, &mut seen, |i| {
        i.by_pod_uid(SEARCH_UID).is_some()
    })
    .await;
    assert_eq!(
        uids(&last),
        [
            "cart-5c4f9d7b8-k9m2p",
            "checkout-7d9f8b6c5d-x2x7k",
            "node-exporter-q8w2z",
            "search-6d8f7c9b5-z4x8q"
        ]
    );
    assert!(
        last.by_pod_uid(DEBUG_UID).is_none(),
        "deleted while disconnected"
    );
    assert_eq!(
        workload(&last, SEARCH_UID),
        w("ReplicaSet", "search-6d8f7c9b5"),
        "a forbidden owner lookup falls back to the owner"
    );
    assert!(
        last.by_container_id(&"d".repeat(64)).is_none(),
        "deleted pod's container"
    );

    // Every snapshot after the first list is a complete view: never a half-applied event.
    for index in &seen {
        assert!(index.synced);
        assert!(
            index.by_pod_uid(EXPORTER_UID).is_some(),
            "{:?}",
            uids(index)
        );
    }

    // What the server saw, in order.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paths = server.log.paths();
    let pods = format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}");
    let watch_from = |v: &str| {
        format!("{pods}&watch=1&allowWatchBookmarks=true&resourceVersion={v}&timeoutSeconds=240")
    };
    let pod_requests: Vec<&String> = paths.iter().filter(|p| p.starts_with("/api/")).collect();
    assert_eq!(
        pod_requests,
        [
            &pods,
            &watch_from("1000"),
            &watch_from("1005"),
            &pods,
            &watch_from("2000")
        ],
        "list, watch, rewatch from the bookmark, relist after 410, watch"
    );
    // Owners: each looked up once (checkout's pod was seen three times).
    let owner_lookups = |name: &str| paths.iter().filter(|p| p.ends_with(name)).count();
    assert_eq!(owner_lookups("/replicasets/checkout-7d9f8b6c5d"), 1);
    assert_eq!(owner_lookups("/jobs/report-28901234"), 1);
    assert_eq!(owner_lookups("/replicasets/cart-5c4f9d7b8"), 1);
    assert_eq!(owner_lookups("/replicasets/search-6d8f7c9b5"), 1);
    assert_eq!(
        owner_lookups("/daemonsets/node-exporter"),
        0,
        "DaemonSets are not looked up"
    );
    // The token on every request.
    for (path, auth) in server.log.0.lock().unwrap().iter() {
        assert_eq!(auth.as_deref(), Some(&*format!("Bearer {TOKEN}")), "{path}");
    }
    let m = metrics.snapshot();
    assert_eq!(m.get("k8s_pod_lists"), Some(&2));
    assert_eq!(m.get("k8s_watch_restarts"), Some(&1));
    assert_eq!(m.get("k8s_watch_expired"), Some(&1));
    assert_eq!(m.get("k8s_owner_lookups_failed"), Some(&1));
    assert_eq!(m.get("k8s_api_errors"), None);
}

#[tokio::test]
async fn processes_map_to_pods_and_resource_attributes() {
    let server = serve().await;
    let mut handle = watcher::spawn(client(&server), fast_config(), Metrics::default());
    let index = until(&mut handle, &mut Vec::new(), |i| i.synced).await;

    // From a cgroup path (containerd, systemd driver) to the pod and container.
    let identity = profiler_agent::k8s::cgroup::parse_path(&format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        CHECKOUT_UID.replace('-', "_"),
        "b".repeat(64)
    ));
    let found = handle
        .lookup(&identity)
        .expect("pod of the istio-proxy container");
    assert_eq!(found.pod.uid, CHECKOUT_UID);
    assert_eq!(found.container.as_ref().unwrap().name, "istio-proxy");
    let attributes: BTreeMap<String, String> = found
        .pod
        .resource_attributes(found.container.as_ref())
        .into_iter()
        .collect();
    let expected: BTreeMap<String, String> = [
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.name", "checkout-7d9f8b6c5d-x2x7k"),
        ("k8s.pod.uid", CHECKOUT_UID),
        ("k8s.deployment.name", "checkout"),
        ("k8s.container.name", "istio-proxy"),
        ("container.id", &"b".repeat(64)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(attributes, expected);
    assert_eq!(found.pod.app_name(), Some("checkout"));

    // A container the pod does not list yet: the pod is still found by its uid.
    let unknown = CgroupIdentity {
        container_id: Some("9".repeat(64)),
        runtime: None,
        pod_uid: Some(DEBUG_UID.to_owned()),
    };
    let found = index.lookup(&unknown).expect("by pod uid");
    assert_eq!(found.pod.name, "debug");
    assert!(found.container.is_none());
    // A process outside any pod.
    assert!(index.lookup(&CgroupIdentity::default()).is_none());
}

#[tokio::test]
async fn an_unreachable_api_is_retried_without_failing() {
    // A port with nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let metrics = Metrics::default();
    let client = ApiClient::new(ApiConfig::from_url(&format!("http://{addr}")).unwrap()).unwrap();
    let handle = watcher::spawn(client, fast_config(), metrics.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metrics.get("k8s_api_errors") < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no retries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let index = handle.current();
    assert!(!index.synced && index.is_empty());
}

#[tokio::test]
async fn outside_a_cluster_there_is_no_metadata() {
    let metrics = Metrics::default();
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        assert!(start_pod_metadata(&KubernetesOptions::default(), &metrics).is_none());
    }
    // An API URL without a node name: refused (watching every pod of a cluster is not the
    // agent's business).
    let options = KubernetesOptions {
        api_url: Some("http://127.0.0.1:1".into()),
        node_name: None,
    };
    assert!(start_pod_metadata(&options, &metrics).is_none());
    let options = KubernetesOptions {
        api_url: Some("not a url".into()),
        node_name: Some(NODE.into()),
    };
    assert!(start_pod_metadata(&options, &metrics).is_none());
}
