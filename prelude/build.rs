// Binaries and tests of this package find libtorch without LD_LIBRARY_PATH: torch-sys
// tells its direct dependents where the library lives, and we bake that into an rpath.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Exposed to the crate so the runtime can dlopen libtorch_cuda.so from the same place.
        println!("cargo:rustc-env=PIVOT_LIBTORCH_LIB={lib}");
    }
}
