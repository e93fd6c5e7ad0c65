//! PIVOT Lab kernel: the Jupyter front end (`jupyter`) over the `pivot-engine` crate.
//!
//! The Jupyter modules reach the engine as `crate::engine` and the scanner as `crate::scan`
//! (re-exported below), so they read the same as before the engine became its own crate.

pub use pivot_engine as engine;
pub use pivot_engine::scan;

pub mod jupyter;
