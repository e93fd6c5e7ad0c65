// The evcxr child is this executable; cells find the interrupt flag it defines (in
// pivot_engine::child) with dlsym(RTLD_DEFAULT), which only sees the dynamic symbol table.
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=PIVOT_INTERRUPT_FLAG");
}
