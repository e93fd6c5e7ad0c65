//! `pivot-engine`: the evaluation engine shared by every front end (Jupyter kernel, REPL,
//! notebook runner): an evcxr session with the PIVOT prelude preloaded in a persistent build
//! slot (`session`, `slots`), the evcxr child process (`child`), its output turned into ordered
//! events (`output`), cooperative interrupt, and the input scanner (`scan`).
//!
//! Front ends only translate `Event`s and `CellResult`s into their own vocabulary; none of the
//! Jupyter wire protocol (libzmq, tokio, hmac) is linked here, so the REPL does not carry it.

pub mod analysis;
pub mod buildlog;
pub mod celllink;
pub mod child;
pub mod fastbuild;
pub mod jobctl;
pub mod output;
pub mod paths;
pub mod racargo;
pub mod scan;
pub mod session;
pub mod signal;
pub mod slots;
pub mod spare;

pub use output::{Event, Sink, StreamName};
pub use session::{prepare_process_env, prepare_process_env_for, CellError, CellResult, Frontend, InterruptOutcome, Interrupter, Session, SessionOptions};
