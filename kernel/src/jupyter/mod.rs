//! Jupyter front end: wire protocol, kernel server, kernelspec install, notebook runner.

pub mod guard;
pub mod history;
pub mod install;
pub mod nbrun;
pub mod server;
pub mod wire;
