//! The evaluation engine shared by every front end (Jupyter kernel, REPL, notebook runner):
//! an evcxr session with the PIVOT prelude preloaded in a persistent build slot, its output
//! turned into ordered events, and cooperative interrupt.

pub mod buildlog;
pub mod output;
pub mod paths;
pub mod session;
pub mod slots;

pub use output::{Event, Sink, StreamName};
pub use session::{prepare_process_env, CellError, CellResult, Frontend, Interrupter, Session, SessionOptions};
