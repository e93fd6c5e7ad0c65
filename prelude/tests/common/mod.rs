//! Helpers shared by the integration tests: where the generated fixtures and the project's
//! Python live, and a relative-error comparison.
#![allow(dead_code)]

use pivot::model::Checkpoint;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// Directory written by `tests/python/make_parity_fixtures.py` (`make fixtures`).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("PIVOT_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/generated")
    });
    assert!(
        dir.join("clip/reference.safetensors").is_file(),
        "parity fixtures missing in {}: run `make fixtures` (the test command does)",
        dir.display()
    );
    dir
}

/// The project's Python (with torch and transformers), for round trips through `transformers`.
pub fn python() -> PathBuf {
    let p = std::env::var_os("PIVOT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(p.is_file(), "python not found at {}: run `make venv` or set PIVOT_PYTHON", p.display());
    p
}

pub fn python_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python").join(name)
}

pub fn reference(dir: &str) -> Checkpoint {
    Checkpoint::open(fixtures().join(dir).join("reference.safetensors")).expect("reference outputs")
}

/// max |a − b| / max |b|, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let num = (&a - &b).abs().max().double_value(&[]);
    let den = b.abs().max().double_value(&[]).max(1e-12);
    num / den
}

pub fn assert_close(name: &str, ours: &Tensor, theirs: &Tensor, tol: f64) {
    let e = rel_err(ours, theirs);
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:.0e}");
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pivot-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
