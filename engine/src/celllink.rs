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
//!
//! Some of those libraries are not among the dylib's DT_NEEDED either: `libpivot.so` was itself
//! linked `--as-needed`, and referenced nothing in `libtorch_cuda.so` or `libtorch.so` (the
//! prelude loads the CUDA library at run time, `device.rs`). They cost the cell's link 0.02 s
//! (measured, benches/README.md "Issue 16, session 14"). A `-lNAME` is also dropped when it sits in
//! an `--as-needed`, dynamic part of the command line, its `libNAME.so` is found in a `-L` folder,
//! and that library defines none of the symbols that anything on the command line leaves
//! undefined: the cell's objects, the archives' members and the Rust dylibs. Such a library
//! can neither bind a symbol nor become a dependency of the cell, so the link's output is the
//! same without it. The definitions are looked up in the library's GNU hash table, so even a
//! gigabyte library costs a few reads. Anything this cannot read or decide keeps the library.

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
    let args = without_needed(args, &needed);
    without_unreferenced(&args)
}

/// `args` without each `-lNAME` that cannot change the link (module doc): dynamic and
/// `--as-needed` at its place, `libNAME.so` the first match in the `-L` folders, and defining
/// none of the symbols left undefined by the objects, archives and shared objects on the line.
fn without_unreferenced(args: &[OsString]) -> Vec<OsString> {
    let candidates = droppable_positions(args);
    if candidates.is_empty() {
        return args.to_vec();
    }
    let Some(undefined) = undefined_symbols(args) else { return args.to_vec() };
    let dirs = search_dirs(args);
    let mut drop = BTreeSet::new();
    for (i, name) in candidates {
        let Some(so) = find_library(&dirs, &name) else { continue };
        if let Ok(false) = defines_any(&so, &undefined) {
            drop.insert(i);
        }
    }
    args.iter().enumerate().filter(|(i, _)| !drop.contains(i)).map(|(_, a)| a.clone()).collect()
}

/// The positions and names of the `-lNAME`s (not the C runtime's) that the linker would look up
/// as shared libraries with `--as-needed` in effect. `-static` anywhere makes none.
fn droppable_positions(args: &[OsString]) -> Vec<(usize, String)> {
    let (mut as_needed, mut dynamic) = (false, true);
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let Some(a) = a.to_str() else { continue };
        if a == "-static" {
            return Vec::new();
        }
        for flag in a.strip_prefix("-Wl,").map(|f| f.split(',').collect()).unwrap_or_else(|| vec![a]) {
            match flag {
                "--as-needed" | "-as-needed" => as_needed = true,
                "--no-as-needed" | "-no-as-needed" => as_needed = false,
                "-Bstatic" | "-dn" | "-non_shared" | "-static" => dynamic = false,
                "-Bdynamic" | "-dy" | "-call_shared" => dynamic = true,
                _ => {}
            }
        }
        if let Some(name) = a.strip_prefix("-l")
            && as_needed
            && dynamic
            && !name.is_empty()
            && !name.starts_with(':')
            && !ALWAYS_KEPT.contains(&name)
        {
            out.push((i, name.to_string()));
        }
    }
    out
}

/// The `-L` folders, in order (`-L DIR` and `-LDIR`).
fn search_dirs(args: &[OsString]) -> Vec<std::path::PathBuf> {
    let mut dirs = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let bytes = a.as_encoded_bytes();
        if bytes == b"-L" {
            dirs.extend(it.next().map(std::path::PathBuf::from));
        } else if let Some(d) = a.to_str().and_then(|s| s.strip_prefix("-L")) {
            dirs.push(std::path::PathBuf::from(d));
        }
    }
    dirs
}

/// Where the linker finds `-lNAME` among `dirs` when that is a shared object; `None` when the
/// first match is an archive or there is none (the compiler's own folders are not searched).
fn find_library(dirs: &[std::path::PathBuf], name: &str) -> Option<std::path::PathBuf> {
    for d in dirs {
        let so = d.join(format!("lib{name}.so"));
        if so.is_file() {
            return Some(so);
        }
        if d.join(format!("lib{name}.a")).is_file() {
            return None;
        }
    }
    None
}

/// Every symbol that the objects, the archives' members and the shared objects on the command
/// line leave undefined; `None` when one of them cannot be read.
fn undefined_symbols(args: &[OsString]) -> Option<BTreeSet<Vec<u8>>> {
    use object::read::archive::ArchiveFile;
    let mut out = BTreeSet::new();
    for a in args {
        let p = Path::new(a);
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "o" | "a" | "rlib" | "so") || !p.is_file() {
            continue;
        }
        let data = mapped(p).ok()?;
        match ext {
            "so" => out.extend(dylib_undefined(&data).ok()?),
            "o" => object_undefined(&data, &mut out).ok()?,
            _ => {
                let archive = ArchiveFile::parse(&*data).ok()?;
                for member in archive.members() {
                    let member = member.ok()?;
                    // Rust archives also hold their metadata (`lib.rmeta`), which is not an object;
                    // any other member that is not one (bitcode, say) leaves the answer unknown.
                    if member.name().ends_with(b".rmeta") {
                        continue;
                    }
                    object_undefined(member.data(&*data).ok()?, &mut out).ok()?;
                }
            }
        }
    }
    Some(out)
}

/// The file mapped read-only: parsing touches a few pages of files up to gigabytes (libtorch's),
/// where reading would copy them whole.
fn mapped(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)?;
    // SAFETY: the map is only read, while the link that named the file runs; build outputs and
    // toolchain libraries are not rewritten in place during a link.
    unsafe { memmap2::Mmap::map(&file) }
}

fn object_undefined(data: &[u8], out: &mut BTreeSet<Vec<u8>>) -> Result<(), String> {
    use object::{Object, ObjectSymbol};
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    for sym in file.symbols() {
        if sym.is_undefined()
            && let Ok(name) = sym.name_bytes()
            && !name.is_empty()
        {
            out.insert(name.to_vec());
        }
    }
    Ok(())
}

/// The undefined dynamic symbols of a 64-bit ELF shared object.
fn dylib_undefined(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use object::read::elf::Sym;
    let (endian, sections) = elf_sections(data)?;
    let symbols = sections.symbols(endian, data, object::elf::SHT_DYNSYM).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for sym in symbols.symbols().iter().skip(1) {
        if sym.is_undefined(endian) {
            out.push(sym.name(endian, symbols.strings()).map_err(|e| e.to_string())?.to_vec());
        }
    }
    Ok(out)
}

/// Whether the shared object at `path` defines (exports) any of `names`, by its GNU hash table.
/// An error when it is not a 64-bit ELF shared object with one (a linker script, say).
fn defines_any(path: &Path, names: &BTreeSet<Vec<u8>>) -> Result<bool, String> {
    use object::elf;
    use object::read::elf::{Sym, VersionTable};
    let data = mapped(path).map_err(|e| e.to_string())?;
    let data = &*data;
    let (endian, sections) = elf_sections(data)?;
    let (hash, _) = sections.gnu_hash(endian, data).map_err(|e| e.to_string())?.ok_or("no GNU hash table")?;
    let symbols = sections.symbols(endian, data, elf::SHT_DYNSYM).map_err(|e| e.to_string())?;
    let versions = VersionTable::default();
    Ok(names.iter().any(|name| {
        hash.find(endian, name, elf::gnu_hash(name), None, &symbols, &versions)
            .is_some_and(|(_, sym)| !sym.is_undefined(endian))
    }))
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

/// The DT_NEEDED entries of an ELF shared object (mapped: only the headers, the dynamic section and
/// its string table are touched, and `libpivot.so` is ~100 MB).
fn dt_needed(path: &Path) -> Result<Vec<String>, String> {
    use object::read::elf::{Dyn, SectionHeader};
    let data = mapped(path).map_err(|e| e.to_string())?;
    let data = &*data;
    let (endian, sections) = elf_sections(data)?;
    let mut out = Vec::new();
    for section in sections.iter() {
        let Some((entries, link)) = section.dynamic(endian, data).map_err(|e| e.to_string())? else { continue };
        let strings = sections.strings(endian, data, link).map_err(|e| e.to_string())?;
        for d in entries {
            if d.tag(endian) == object::elf::DT_NEEDED {
                let name = d.string(endian, strings).map_err(|e| e.to_string())?;
                out.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(out)
}

/// The section table of a 64-bit ELF file, and its byte order.
fn elf_sections(data: &[u8]) -> Result<(object::Endianness, ElfSections<'_>), String> {
    use object::read::elf::FileHeader;
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    Ok((endian, header.sections(endian, data).map_err(|e| e.to_string())?))
}

type ElfSections<'a> = object::read::elf::SectionTable<'a, object::elf::FileHeader64<object::Endianness>>;

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
    fn only_dynamic_as_needed_libraries_are_candidates() {
        let args = os(&["-lfirst", "-Wl,--as-needed", "-Wl,-Bdynamic", "-la", "-lc", "-l:libz.so", "-Wl,-Bstatic", "-lb", "-Wl,-Bdynamic", "-lc10", "-Wl,--no-as-needed", "-ld"]);
        assert_eq!(droppable_positions(&args), vec![(3, "a".to_string()), (9, "c10".to_string())]);
        assert!(droppable_positions(&os(&["-Wl,--as-needed", "-la", "-static"])).is_empty());
        let dirs = search_dirs(&os(&["-L", "/one", "-L/two", "-Lthree", "x.o"]));
        assert_eq!(dirs, ["/one", "/two", "three"].map(std::path::PathBuf::from));
    }

    #[test]
    fn a_library_that_defines_nothing_the_link_needs_is_dropped() {
        // Real files, built with the C compiler that links every cell: an object that calls
        // `pivot_used`, a library that defines it, one that defines something else, and an
        // archive that comes first under one name and so is never dropped.
        let dir = std::env::temp_dir().join(format!("pivot-celllink-syms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cc = |args: &[&str]| assert!(std::process::Command::new(DEFAULT_LINKER).args(args).current_dir(&dir).status().unwrap().success(), "cc {args:?}");
        std::fs::write(dir.join("used.c"), "int pivot_used(void) { return 1; }\n").unwrap();
        std::fs::write(dir.join("other.c"), "int pivot_other(void) { return 2; }\n").unwrap();
        std::fs::write(dir.join("cell.c"), "int pivot_used(void);\nint cell(void) { return pivot_used(); }\n").unwrap();
        cc(&["-shared", "-fPIC", "used.c", "-o", "libused.so"]);
        cc(&["-shared", "-fPIC", "other.c", "-o", "libother.so"]);
        cc(&["-c", "-fPIC", "cell.c", "-o", "cell.o"]);
        std::fs::copy(dir.join("libother.so"), dir.join("libarchived.so")).unwrap();
        std::fs::write(dir.join("libarchived.a"), b"!<arch>\n").unwrap();
        let first = dir.join("first");
        std::fs::create_dir_all(&first).unwrap();
        std::fs::rename(dir.join("libarchived.a"), first.join("libarchived.a")).unwrap();
        let d = dir.display().to_string();
        let f = first.display().to_string();
        let cell = dir.join("cell.o").display().to_string();
        let args = os(&["-shared", &cell, "-Wl,--as-needed", "-L", &f, "-L", &d, "-lused", "-lother", "-larchived", "-lnowhere", "-o", "libcell.so"]);
        let kept = without_unreferenced(&args);
        assert_eq!(kept, os(&["-shared", &cell, "-Wl,--as-needed", "-L", &f, "-L", &d, "-lused", "-larchived", "-lnowhere", "-o", "libcell.so"]));
        // The link with what is kept (less the two made-up names) succeeds, and the cell still
        // needs the library it uses.
        let link: Vec<&str> = kept.iter().map(|a| a.to_str().unwrap()).filter(|a| !["-larchived", "-lnowhere"].contains(a)).collect();
        assert_eq!(without_unreferenced(&os(&link)), os(&link));
        cc(&link);
        let needed = dt_needed(&dir.join("libcell.so")).unwrap();
        assert!(needed.contains(&"libused.so".to_string()), "{needed:?}");
        // Without --as-needed a listed library always becomes a dependency: nothing is dropped.
        let plain = os(&["-shared", &cell, "-L", &d, "-lused", "-lother"]);
        assert_eq!(without_unreferenced(&plain), plain);
        // Nor when an archive on the line holds a member that is not an object (its undefined
        // symbols are unknown); Rust metadata members are not objects and are passed over.
        std::fs::write(dir.join("lib.rmeta"), b"rust metadata").unwrap();
        std::fs::write(dir.join("notes.bc"), b"not an object").unwrap();
        let ar = |args: &[&str]| assert!(std::process::Command::new("ar").args(args).current_dir(&dir).status().unwrap().success());
        ar(&["crs", "librust.rlib", "cell.o", "lib.rmeta"]);
        ar(&["crs", "libmixed.a", "cell.o", "notes.bc"]);
        let rlib = dir.join("librust.rlib").display().to_string();
        let mixed = dir.join("libmixed.a").display().to_string();
        let with_rlib = os(&["-shared", &rlib, "-Wl,--as-needed", "-L", &d, "-lused", "-lother"]);
        assert_eq!(without_unreferenced(&with_rlib), os(&["-shared", &rlib, "-Wl,--as-needed", "-L", &d, "-lused"]));
        let with_mixed = os(&["-shared", &mixed, "-Wl,--as-needed", "-L", &d, "-lused", "-lother"]);
        assert_eq!(without_unreferenced(&with_mixed), with_mixed);
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
