//! Builds of the OTEP 4947 fixtures (`tests/fixtures/otel_ctx/`), every variant the readers
//! must handle; the gcc lines are the ones in that directory's README.

use std::{path::PathBuf, sync::OnceLock};

use crate::{build_c_sources, fixture_dir};

const FLAGS: &[&str] = &["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"];

pub struct Builds {
    pub exe_le: PathBuf,
    pub garbage: PathBuf,
    pub lib_desc: PathBuf,
    pub lib_gd: PathBuf,
    pub lib_ie: PathBuf,
    pub driver_desc: PathBuf,
    pub driver_gd: PathBuf,
    pub driver_ie: PathBuf,
    pub driver_dlopen: PathBuf,
}

/// The common fixture flags followed by `extra`.
fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [FLAGS, extra].concat()
}

/// Every fixture variant, built once per test process.
pub fn builds() -> &'static Builds {
    static BUILDS: OnceLock<Builds> = OnceLock::new();
    BUILDS.get_or_init(|| {
        let exe = |sources: &[&str], output| {
            build_c_sources(
                sources,
                output,
                &with(&[
                    "-DWRITER_LINKED",
                    "-mtls-dialect=gnu2",
                    "-Wl,--export-dynamic-symbol=otel_thread_ctx_v1",
                ]),
            )
        };
        let lib = |name: &str, model: &str| {
            let soname = format!("-Wl,-soname,{name}");
            build_c_sources(
                &["otel_ctx/writer.c"],
                name,
                &with(&["-fPIC", "-shared", model, &soname]),
            )
        };
        let lib_desc = lib("libotelctx-desc.so", "-mtls-dialect=gnu2");
        let lib_gd = lib("libotelctx-gd.so", "-mtls-dialect=gnu");
        let lib_ie = lib("libotelctx-ie.so", "-ftls-model=initial-exec");
        let fixtures = fixture_dir();
        let search = format!("-L{}", fixtures.display());
        let driver = |output, library: &str| {
            build_c_sources(
                &["otel_ctx/main.c"],
                output,
                &with(&["-DWRITER_LINKED", &search, library, "-Wl,-rpath,$ORIGIN"]),
            )
        };
        Builds {
            exe_le: exe(&["otel_ctx/main.c", "otel_ctx/writer.c"], "otel-exe-le"),
            garbage: exe(&["otel_ctx/garbage.c", "otel_ctx/writer.c"], "otel-garbage"),
            driver_desc: driver("otel-driver-desc", "-lotelctx-desc"),
            driver_gd: driver("otel-driver-gd", "-lotelctx-gd"),
            driver_ie: driver("otel-driver-ie", "-lotelctx-ie"),
            driver_dlopen: build_c_sources(&["otel_ctx/main.c"], "otel-driver-dlopen", FLAGS),
            lib_desc,
            lib_gd,
            lib_ie,
        }
    })
}
