//! The cell's link without the native libraries the prelude already depends on.
//!
//! rustc links every cell (a `cdylib`) with each native library its dependencies declared:
//! torch-sys's `-ltorch_cuda -ltorch_cpu -ltorch -lc10`, `-lgomp`, `-lstdc++`. The cell does not
//! need them: it calls tch through `libpivot.so` (the prelude's dylib), which depends on all of
//! them, and the loader finds any symbol the cell leaves undefined in that dependency tree when
//! evcxr's child loads the cell. lld still opens each one and reads its symbol table, and
//! libtorch's are large (the CUDA wheel's `libtorch_cuda.so` alone is over a gigabyte): measured
//! on the 2-core machine, 0.109 s of a trivial cell's 0.11 s link, against 0.048 s without them.
//!
//! So the cell crate's rustc (and only it: `fastbuild::wrapper_hook` adds `-C linker` for it, in
//! the real cargo build and in the recorded invocation that `fastbuild` replays) runs our
//! executable as its linker under the name `pivot-cc` (`link_main`). It drops `-lNAME` when
//! `libNAME.so` is among the DT_NEEDED entries of a Rust dylib on the same command line, keeps
//! the C runtime's own libraries, and runs `cc` with the rest, as rustc would have. A library the
//! dylibs do not already load (a cell's own `#[link]`) is kept. `PIVOT_NO_CELLLINK=1` turns it off.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

/// The name rustc runs as the cell's linker; `fastbuild::install` puts it beside `mold`.
pub const LINKER_NAME: &str = "pivot-cc";
/// Set (to anything): cells link with every library rustc names, as without this module.
pub const DISABLE_ENV: &str = "PIVOT_NO_CELLLINK";
/// The linker rustc runs for this target when none is configured (`-C linker`).
const DEFAULT_LINKER: &str = "cc";
/// Kept even when a dylib needs them: the C runtime, which costs the linker nothing.
const ALWAYS_KEPT: [&str; 7] = ["c", "m", "dl", "rt", "pthread", "util", "gcc_s"];

/// Runs the link as `pivot-cc`: `args` without the argv[0]. Returns the exit status.
pub fn link_main(args: &[OsString]) -> i32 {
    let args = filtered(args);
    match std::process::Command::new(DEFAULT_LINKER).args(&args).status() {
        Ok(s) => s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("pivot: cannot run the linker {DEFAULT_LINKER}: {e}");
            1
        }
    }
}

/// The arguments without the `-lNAME`s that the Rust dylibs among them already need. A
/// response file (`@FILE`), which rustc writes for very long command lines, is passed on as it
/// is, and so is everything when a dylib cannot be read.
fn filtered(args: &[OsString]) -> Vec<OsString> {
    if args.iter().any(|a| a.as_encoded_bytes().starts_with(b"@")) {
        return args.to_vec();
    }
    let mut needed = BTreeSet::new();
    for a in args {
        let p = Path::new(a);
        if p.extension().is_some_and(|e| e == "so") && p.is_file() {
            match dt_needed(p) {
                Ok(n) => needed.extend(n),
                Err(_) => return args.to_vec(),
            }
        }
    }
    without_needed(args, &needed)
}

/// `args` without each `-lNAME` whose `libNAME.so` (or `libNAME.so.VERSION`) is in `needed`,
/// except the C runtime's.
fn without_needed(args: &[OsString], needed: &BTreeSet<String>) -> Vec<OsString> {
    args.iter()
        .filter(|a| {
            let Some(name) = a.to_str().and_then(|s| s.strip_prefix("-l")) else { return true };
            if name.is_empty() || name.starts_with(':') || ALWAYS_KEPT.contains(&name) {
                return true;
            }
            let so = format!("lib{name}.so");
            !needed.iter().any(|n| *n == so || n.strip_prefix(&so).is_some_and(|v| v.starts_with('.')))
        })
        .cloned()
        .collect()
}

/// The DT_NEEDED entries of an ELF shared object, read lazily (only the headers, the dynamic
/// section and its string table: `libpivot.so` is ~100 MB).
fn dt_needed(path: &Path) -> Result<Vec<String>, String> {
    use object::read::elf::{Dyn, FileHeader, SectionHeader};
    use object::{elf, Endianness};
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let cache = object::read::ReadCache::new(file);
    let header = elf::FileHeader64::<Endianness>::parse(&cache).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, &cache).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for section in sections.iter() {
        let Some((entries, link)) = section.dynamic(endian, &cache).map_err(|e| e.to_string())? else { continue };
        let strings = sections.strings(endian, &cache, link).map_err(|e| e.to_string())?;
        for d in entries {
            if d.tag(endian) == elf::DT_NEEDED {
                let name = d.string(endian, strings).map_err(|e| e.to_string())?;
                out.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn libraries_the_dylibs_need_are_dropped_and_the_rest_kept() {
        let needed: BTreeSet<String> = ["libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libc.so.6", "libstdc++.so.6"].map(String::from).into();
        let args = os(&["-o", "x.so", "-ltorch_cpu", "-lc10", "-lgomp", "-lstdc++", "-lgomp_extra", "-lmine", "-lc", "-l:libz.so", "-l"]);
        assert_eq!(without_needed(&args, &needed), os(&["-o", "x.so", "-lgomp_extra", "-lmine", "-lc", "-l:libz.so", "-l"]));
    }

    #[test]
    fn needed_entries_are_read_from_a_real_shared_object() {
        // A copy of this test executable under a `.so` name: an ELF file with the DT_NEEDED of a
        // Rust binary (libc at least), which `filtered` finds on the command line.
        let dir = std::env::temp_dir().join(format!("pivot-celllink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let so = dir.join("libfake.so");
        std::fs::copy(std::env::current_exe().unwrap(), &so).unwrap();
        let needed = dt_needed(&so).unwrap();
        let libc = needed.iter().find(|n| n.starts_with("libc.so")).cloned();
        let other = needed.iter().find(|n| !n.starts_with("libc.so") && !n.starts_with("ld-linux")).cloned();
        assert!(libc.is_some(), "{needed:?}");
        if let Some(other) = other {
            let name = other.strip_prefix("lib").unwrap().split(".so").next().unwrap().to_string();
            let args = vec![OsString::from(&so), OsString::from(format!("-l{name}")), OsString::from("-lsurely_not_needed")];
            let kept = filtered(&args);
            let dropped = !ALWAYS_KEPT.contains(&name.as_str());
            assert_eq!(kept.len(), if dropped { 2 } else { 3 }, "{needed:?} {kept:?}");
            assert!(kept.contains(&OsString::from("-lsurely_not_needed")));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_readable_dylib_or_with_a_response_file_nothing_is_dropped() {
        let dir = std::env::temp_dir().join(format!("pivot-celllink-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("libpivot.so");
        std::fs::write(&bad, b"not an ELF file").unwrap();
        let args = vec![OsString::from("-ltorch_cpu"), OsString::from(&bad)];
        assert_eq!(filtered(&args), args);
        let with_rsp = os(&["@/tmp/linker-arguments", "-ltorch_cpu"]);
        assert_eq!(filtered(&with_rsp), with_rsp);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
