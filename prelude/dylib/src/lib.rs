//! The prelude, re-exported whole from a `dylib` (see Cargo.toml for why). The engine depends
//! on this crate as `pivot` (`paths::prelude_dep`); nothing else does.

pub use pivot_core::*;
