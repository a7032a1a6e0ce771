//! ELF TLS resolution against live processes: for every access model OTEP 4947 allows, start
//! the `otel_ctx` fixture, resolve `otel_thread_ctx_v1` from its ELF file and memory, and check
//! that the resolved location, followed from each worker's thread pointer as the eBPF program
//! will, lands exactly on the address the worker printed and holds one of its records.
//! Also checks that the garbage fixture cycles through every state it documents.
//! Needs root (reads other processes' memory); run through `cargo xtask test`.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use procfs::process::{MMapPath, MemoryMap, Process};
use profiler_agent::process::tls::{
    LibcFlavor, TlsAccess, find_tls_symbol, load_bias, read_memory, resolve, tls_address,
};
use profiler_common::{ThreadContextHeader, TlsLocation};
use profiler_tests::{otel_ctx::builds, *};

const SYMBOL: &str = "otel_thread_ctx_v1";
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    LocalExec,
    InitialExec,
    StaticDescriptor,
    DynamicDescriptor,
    GeneralDynamic,
}

struct Variant<'a> {
    name: &'a str,
    binary: &'a Path,
    dlopen: Option<&'a Path>,
    env: &'a [(&'a str, &'a str)],
    /// The ELF object that defines the symbol.
    object: &'a Path,
    expect: Expect,
}

/// One worker as the fixture reports it.
#[derive(Debug)]
struct Worker {
    tid: u32,
    thread_pointer: u64,
    slot: u64,
    traces: Vec<[u8; 16]>,
}

fn parse_hex_u64(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex number")
}

fn parse_trace(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex byte");
    }
    out
}

/// `tls <tid> <tp> <slot>` and `ctx <tid> a|b <trace> <span>` lines, per worker.
fn workers(preamble: &[String]) -> Vec<Worker> {
    let mut workers: Vec<Worker> = preamble
        .iter()
        .filter_map(|l| l.strip_prefix("tls "))
        .map(|rest| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            Worker {
                tid: f[0].parse().expect("tid"),
                thread_pointer: parse_hex_u64(f[1]),
                slot: parse_hex_u64(f[2]),
                traces: Vec::new(),
            }
        })
        .collect();
    for rest in preamble.iter().filter_map(|l| l.strip_prefix("ctx ")) {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let tid: u32 = f[0].parse().expect("tid");
        if let Some(w) = workers.iter_mut().find(|w| w.tid == tid) {
            w.traces.push(parse_trace(f[2]));
        }
    }
    workers
}

fn read_u64(pid: u32, addr: u64) -> Option<u64> {
    let mut buf = [0u8; 8];
    read_memory(pid, addr, &mut buf).ok()?;
    Some(u64::from_ne_bytes(buf))
}

fn read_header(pid: u32, addr: u64) -> Option<ThreadContextHeader> {
    let mut buf = [0u8; size_of::<ThreadContextHeader>()];
    read_memory(pid, addr, &mut buf).ok()?;
    // SAFETY: ThreadContextHeader is packed plain data of exactly this size.
    Some(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) })
}

fn object_maps(maps: &[MemoryMap], object: &Path) -> Vec<MemoryMap> {
    let object = std::fs::canonicalize(object).expect("canonical object path");
    maps.iter()
        .filter(|m| matches!(&m.pathname, MMapPath::Path(p) if *p == object))
        .cloned()
        .collect()
}

fn check_variant(v: &Variant) {
    require_root();
    let mut command = Command::new(v.binary);
    command.args(["-t", "2"]);
    if let Some(lib) = v.dlopen {
        command.arg(lib);
    }
    command.envs(v.env.iter().copied());
    let fixture = Fixture::start(command);
    let pid = fixture.pid;
    let workers = workers(&fixture.preamble);
    assert_eq!(workers.len(), 2, "{}: {:?}", v.name, fixture.preamble);

    let data = std::fs::read(v.object).expect("read object");
    let symbol = find_tls_symbol(&*data, SYMBOL)
        .unwrap_or_else(|e| panic!("{}: {e}", v.name))
        .unwrap_or_else(|| panic!("{}: {SYMBOL} not defined", v.name));
    assert!(symbol.in_dynsym, "{}: {SYMBOL} not in .dynsym", v.name);
    let classified = match symbol.access {
        TlsAccess::LocalExec { .. } => Expect::LocalExec,
        TlsAccess::InitialExec { .. } => Expect::InitialExec,
        TlsAccess::Descriptor { .. } => Expect::StaticDescriptor,
        TlsAccess::GeneralDynamic { .. } => Expect::GeneralDynamic,
    };
    let expected_class = match v.expect {
        Expect::DynamicDescriptor => Expect::StaticDescriptor,
        e => e,
    };
    assert_eq!(classified, expected_class, "{}: access model", v.name);

    let maps = Process::new(pid as i32)
        .and_then(|p| p.maps())
        .expect("fixture maps")
        .0;
    let libc = LibcFlavor::detect(&maps);
    assert_eq!(libc, LibcFlavor::Glibc);
    let bias = load_bias(&*data, &object_maps(&maps, v.object))
        .unwrap_or_else(|e| panic!("{}: load bias: {e}", v.name));
    let loc: TlsLocation =
        resolve(pid, &symbol, bias, libc).unwrap_or_else(|e| panic!("{}: resolve: {e}", v.name));
    println!("{}: {:?} bias {bias:#x} -> {loc:?}", v.name, symbol.access);
    let dynamic = matches!(v.expect, Expect::DynamicDescriptor | Expect::GeneralDynamic);
    assert_eq!(
        loc.module_id != 0,
        dynamic,
        "{}: static/dynamic TLS: {loc:?}",
        v.name
    );
    if let TlsAccess::LocalExec { tp_offset } = symbol.access {
        assert_eq!(loc.offset, tp_offset);
    }

    for w in &workers {
        // On x86_64 the TCB starts with a pointer to itself: the printed value is a real TP.
        assert_eq!(
            read_u64(pid, w.thread_pointer),
            Some(w.thread_pointer),
            "{}: thread {} TCB self-pointer",
            v.name,
            w.tid
        );
        let addr = tls_address(pid, w.thread_pointer, &loc)
            .unwrap_or_else(|e| panic!("{}: thread {}: {e}", v.name, w.tid));
        assert_eq!(
            addr, w.slot,
            "{}: thread {}: resolved {addr:#x}, fixture printed {:#x}",
            v.name, w.tid, w.slot
        );
        assert_eq!(w.traces.len(), 2, "{}: ctx lines of {}", v.name, w.tid);
        // Follow the pointer like the eBPF reader: a valid record of this worker's traces.
        // The worker switches records every few ms, so one read may race with a rebuild.
        let deadline = Instant::now() + Duration::from_secs(2);
        let found = loop {
            let header = read_u64(pid, addr)
                .filter(|p| *p != 0)
                .and_then(|p| read_header(pid, p));
            if let Some(h) = header
                && h.valid == 1
                && w.traces.contains(&h.trace_id)
            {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            found,
            "{}: thread {}: no valid record at {addr:#x}",
            v.name, w.tid
        );
    }
}

#[test]
fn executable_local_exec() {
    let b = builds();
    check_variant(&Variant {
        name: "exe-le",
        binary: &b.exe_le,
        dlopen: None,
        env: &[],
        object: &b.exe_le,
        expect: Expect::LocalExec,
    });
}

#[test]
fn startup_library_tlsdesc_static() {
    let b = builds();
    check_variant(&Variant {
        name: "so-startup",
        binary: &b.driver_desc,
        dlopen: None,
        env: &[],
        object: &b.lib_desc,
        expect: Expect::StaticDescriptor,
    });
}

#[test]
fn dlopened_library_tlsdesc_static_surplus() {
    let b = builds();
    check_variant(&Variant {
        name: "so-dlopen",
        binary: &b.driver_dlopen,
        dlopen: Some(&b.lib_desc),
        env: &[],
        object: &b.lib_desc,
        expect: Expect::StaticDescriptor,
    });
}

#[test]
fn dlopened_library_tlsdesc_dynamic() {
    let b = builds();
    check_variant(&Variant {
        name: "so-dlopen-dynamic",
        binary: &b.driver_dlopen,
        dlopen: Some(&b.lib_desc),
        env: &[("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=0")],
        object: &b.lib_desc,
        expect: Expect::DynamicDescriptor,
    });
}

#[test]
fn startup_library_general_dynamic() {
    let b = builds();
    check_variant(&Variant {
        name: "so-gd",
        binary: &b.driver_gd,
        dlopen: None,
        env: &[],
        object: &b.lib_gd,
        expect: Expect::GeneralDynamic,
    });
}

#[test]
fn dlopened_library_general_dynamic() {
    let b = builds();
    check_variant(&Variant {
        name: "so-gd-dlopen",
        binary: &b.driver_dlopen,
        dlopen: Some(&b.lib_gd),
        env: &[],
        object: &b.lib_gd,
        expect: Expect::GeneralDynamic,
    });
}

#[test]
fn startup_library_initial_exec() {
    let b = builds();
    check_variant(&Variant {
        name: "so-ie",
        binary: &b.driver_ie,
        dlopen: None,
        env: &[],
        object: &b.lib_ie,
        expect: Expect::InitialExec,
    });
}

/// The states garbage.c documents, as a user-space reader tells them apart.
fn garbage_state(pid: u32, slot: u64) -> Option<&'static str> {
    let pointer = read_u64(pid, slot)?;
    if pointer == 0 {
        return Some("null");
    }
    let Some(h) = read_header(pid, pointer) else {
        return Some("unmapped");
    };
    let mut first_attr = [0u8; 1];
    read_memory(pid, pointer + 28, &mut first_attr).ok()?;
    let trace_id = h.trace_id;
    let attrs_size = h.attrs_data_size;
    Some(match h.valid {
        0 => "valid0",
        7 => "valid7",
        1 if attrs_size == 65535 => "bigsize",
        1 if trace_id[..8] == [0xee; 8] => "torn",
        1 if first_attr[0] == 250 => "badkey",
        1 => "good",
        _ => return None,
    })
}

#[test]
fn garbage_fixture_cycles_through_every_state() {
    require_root();
    let b = builds();
    let mut command = Command::new(&b.garbage);
    command.args(["-t", "1"]);
    let fixture = Fixture::start(command);
    let workers = workers(&fixture.preamble);
    assert_eq!(workers.len(), 1);
    let w = &workers[0];

    let data = std::fs::read(&b.garbage).expect("read garbage");
    let symbol = find_tls_symbol(&*data, SYMBOL)
        .expect("parse")
        .expect("symbol");
    let loc = resolve(fixture.pid, &symbol, 0, LibcFlavor::Glibc).expect("resolve");
    let addr = tls_address(fixture.pid, w.thread_pointer, &loc).expect("address");
    assert_eq!(addr, w.slot);

    let all: BTreeSet<&str> = [
        "null", "unmapped", "valid0", "valid7", "bigsize", "badkey", "torn", "good",
    ]
    .into();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen != all && Instant::now() < deadline {
        if let Some(state) = garbage_state(fixture.pid, addr) {
            seen.insert(state);
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    assert_eq!(seen, all, "states seen within 20 s");
}
