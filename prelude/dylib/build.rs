// A Rust `dylib` exports only the Rust items of its crate graph (rustc's version script ends in
// `local: *`), but cells also call C functions of the graph's native static libraries directly
// (tch's generic wrappers inline calls to torch-sys's `atg_*` into the cell). A second version
// script makes every C-named symbol global; lld lets a named pattern win over the bare `*`.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = out.join("export-c-symbols.map");
    std::fs::write(&script, "{\n  global:\n    [!_]*;\n};\n").expect("write the version script");
    println!("cargo:rustc-link-arg=-Wl,--version-script={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
}
