//! PIVOT Lab kernel: the evaluation engine (`engine`), the evcxr child process (`child`), the
//! input scanner shared with the REPL (`scan`) and the Jupyter front end (`jupyter`).

pub mod child;
pub mod engine;
pub mod jupyter;
pub mod scan;
