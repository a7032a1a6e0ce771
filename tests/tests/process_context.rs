//! Reading OTEP 4719 process contexts out of real processes: the C publisher fixture (good,
//! updated, and each kind of garbage) and Datadog's Rust writer.

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use profiler_agent::process::process_context::{
    ProcessContextError, ProcessContextReader, find_mapping, read_published_at,
};
use profiler_tests::{Fixture, build_c};

const INSTANCE_ID: &str = "5b0c7e2a-9d41-4f3e-8a6b-1c2d3e4f5a6b";

/// Built once per test binary: tests run in parallel and must not race gcc on one output.
fn publisher() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            build_c(
                "process_ctx/publisher.c",
                "process-ctx-publisher",
                &["-O2", "-g", "-Wall", "-Wextra", "-Werror"],
            )
        })
        .clone()
}

fn start(mode: &str) -> Fixture {
    let mut command = Command::new(publisher());
    command.arg(mode);
    Fixture::start(command)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Reading another process's memory needs ptrace access: root, as for the other tests.
fn require_access() {
    profiler_tests::require_root();
}

#[test]
fn reads_every_field_of_a_published_context() {
    require_access();
    let fixture = start("good");
    let mut reader = ProcessContextReader::new(fixture.pid);
    let info = reader.read().expect("read context");

    assert_ne!(info.published_at_ns, 0);
    assert_eq!(
        info.resource_attributes,
        pairs(&[
            ("service.name", "checkout"),
            ("service.instance.id", INSTANCE_ID),
            ("deployment.environment.name", "test"),
        ])
    );
    assert_eq!(info.service_name.as_deref(), Some("checkout"));
    assert_eq!(info.schema_version.as_deref(), Some("tlsdesc_v1_dev"));
    assert_eq!(
        info.attribute_key_map,
        ["http.route", "http.method", "user.id"]
    );
    assert_eq!(info.other_attributes, pairs(&[("fixture.answer", "42")]));

    // The reader cached the header address, which the free functions agree on.
    let addr = reader.address().expect("cached address");
    assert_eq!(find_mapping("/proc".as_ref(), fixture.pid).unwrap(), addr);
    assert_eq!(
        read_published_at(fixture.pid, addr).unwrap(),
        info.published_at_ns
    );
    assert_eq!(reader.last_published_at(), Some(info.published_at_ns));
}

#[test]
fn sees_updates_only_when_the_timestamp_changes() {
    require_access();
    let fixture = start("good");
    let mut reader = ProcessContextReader::new(fixture.pid);
    let first = reader
        .read_if_changed()
        .expect("first read")
        .expect("a first read always decodes");
    assert_eq!(first.service_name.as_deref(), Some("checkout"));
    assert_eq!(reader.read_if_changed().expect("unchanged read"), None);

    fixture.signal(libc::SIGUSR1);
    fixture
        .wait_for_line("updated", Duration::from_secs(10))
        .expect("fixture reports the update");

    let second = reader
        .read_if_changed()
        .expect("read after update")
        .expect("the timestamp changed");
    assert_eq!(second.service_name.as_deref(), Some("checkout-v2"));
    assert_ne!(second.published_at_ns, first.published_at_ns);
    // Everything but service.name is the same.
    assert_eq!(
        second.resource_attributes[1..],
        first.resource_attributes[1..]
    );
    assert_eq!(second.attribute_key_map, first.attribute_key_map);
    assert_eq!(reader.read_if_changed().expect("unchanged read"), None);
}

type ErrorCheck = fn(&ProcessContextError) -> bool;

#[test]
fn garbage_publishers_give_errors() {
    require_access();
    let cases: [(&str, ErrorCheck); 6] = [
        (
            "bad-signature",
            |e| matches!(e, ProcessContextError::BadSignature(s) if s == b"OTEL_CTY"),
        ),
        ("bad-version", |e| {
            matches!(e, ProcessContextError::UnsupportedVersion(1))
        }),
        (
            "huge",
            |e| matches!(e, ProcessContextError::PayloadTooLarge(n) if *n == 16 << 20),
        ),
        ("stuck", |e| {
            matches!(e, ProcessContextError::UpdateInProgress { attempts: 3 })
        }),
        ("bad-payload", |e| {
            matches!(e, ProcessContextError::Decode(_))
        }),
        ("bad-pointer", |e| {
            matches!(e, ProcessContextError::Io { .. })
        }),
    ];
    for (mode, expected) in cases {
        let fixture = start(mode);
        let mut reader = ProcessContextReader::new(fixture.pid);
        let error = reader.read().expect_err(mode);
        assert!(expected(&error), "{mode}: {error:?}");
        // Asking again gives the same answer.
        let error = reader.read_if_changed().expect_err(mode);
        assert!(expected(&error), "{mode} (read_if_changed): {error:?}");
    }
}

#[test]
fn a_stuck_update_reads_as_timestamp_zero() {
    require_access();
    let fixture = start("stuck");
    let addr = find_mapping("/proc".as_ref(), fixture.pid).expect("mapping found");
    assert_eq!(read_published_at(fixture.pid, addr).unwrap(), 0);
}

#[test]
fn an_exited_publisher_is_gone() {
    require_access();
    let mut fixture = start("good");
    let mut reader = ProcessContextReader::new(fixture.pid);
    reader.read().expect("read context");
    fixture.signal(libc::SIGKILL);
    fixture.wait();
    assert!(
        matches!(reader.read(), Err(ProcessContextError::Gone)),
        "cached address"
    );
    let mut fresh = ProcessContextReader::new(fixture.pid);
    assert!(
        matches!(fresh.read(), Err(ProcessContextError::Gone)),
        "discovery"
    );
}

/// Datadog's Rust writer (`libdd-library-config`): a second, independent publisher. It keeps
/// the payload on the heap, apart from the header, and always puts
/// `datadog.local_root_span_id` first in the key map.
#[test]
fn reads_the_libdatadog_writer() {
    require_access();
    let fixture = Fixture::start(Command::new(env!("CARGO_BIN_EXE_process_ctx_rust")));
    let mut reader = ProcessContextReader::new(fixture.pid);
    let info = reader.read().expect("read context");

    assert_eq!(info.service_name.as_deref(), Some("checkout"));
    for expected in [
        (
            "service.instance.id",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        ),
        ("service.version", "1.2.3"),
        ("deployment.environment.name", "test"),
        ("telemetry.sdk.language", "rust"),
        ("host.name", "fixture-host"),
    ] {
        assert!(
            info.resource_attributes
                .contains(&(expected.0.into(), expected.1.into())),
            "{expected:?} in {:?}",
            info.resource_attributes
        );
    }
    assert_eq!(info.schema_version.as_deref(), Some("tlsdesc_v1_dev"));
    assert_eq!(
        info.attribute_key_map,
        ["datadog.local_root_span_id", "http.route", "http.method"]
    );

    fixture.signal(libc::SIGUSR1);
    fixture
        .wait_for_line("updated", Duration::from_secs(10))
        .expect("fixture reports the update");
    let updated = reader
        .read_if_changed()
        .expect("read after update")
        .expect("the timestamp changed");
    assert_eq!(updated.service_name.as_deref(), Some("checkout-v2"));
    assert_ne!(updated.published_at_ns, info.published_at_ns);
}
