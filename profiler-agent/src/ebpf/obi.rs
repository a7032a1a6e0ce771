//! OBI's shared `traces_ctx_v1` map: OpenTelemetry eBPF Instrumentation records the active
//! trace context of threads it instruments there (key `pid_tgid`). Whoever starts first creates
//! and pins it; a pin that exists must have exactly OBI's definition, or we refuse to use it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::maps::{MapInfo, MapType};
use profiler_common::obi;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Checks the bpffs root and an existing pin; creates `<root>/otel/` when needed. Returns the
/// pin path for the loader (which opens the pin, or creates and pins the map).
pub fn prepare_pin(root: &Path) -> anyhow::Result<PathBuf> {
    if !is_bpffs(root)? {
        bail!(
            "{} is not a BPF filesystem: mount it (mount -t bpf bpf {}) or point --obi-bpffs-root at OBI's bpffs",
            root.display(),
            root.display()
        );
    }
    let dir = root.join("otel");
    let pin = dir.join(obi::MAP_NAME);
    if pin.exists() {
        let info = MapInfo::from_pin(&pin)
            .with_context(|| format!("open the pinned map {}", pin.display()))?;
        check_definition(
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        )
        .with_context(|| {
            format!(
                "the map pinned at {} is not OBI's traces_ctx_v1",
                pin.display()
            )
        })?;
    } else {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    }
    Ok(pin)
}

fn check_definition(
    map_type: Option<MapType>,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> anyhow::Result<()> {
    if !matches!(map_type, Some(MapType::LruHash)) {
        bail!("type {map_type:?}, expected an LRU hash map");
    }
    if key_size != obi::KEY_SIZE || value_size != obi::VALUE_SIZE {
        bail!(
            "key/value sizes {key_size}/{value_size}, expected {}/{}",
            obi::KEY_SIZE,
            obi::VALUE_SIZE
        );
    }
    if max_entries != obi::MAX_ENTRIES {
        bail!("{max_entries} entries, expected {}", obi::MAX_ENTRIES);
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a zeroed statfs to fill.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_obis_definition() {
        assert!(check_definition(Some(MapType::LruHash), 8, 24, 16384).is_ok());
        assert!(check_definition(Some(MapType::Hash), 8, 24, 16384).is_err());
        assert!(check_definition(Some(MapType::LruHash), 4, 24, 16384).is_err());
        assert!(check_definition(Some(MapType::LruHash), 8, 16, 16384).is_err());
        assert!(check_definition(Some(MapType::LruHash), 8, 24, 1024).is_err());
        assert!(!is_bpffs(Path::new("/")).unwrap());
    }
}
