//! One error type for the whole prelude. Every variant says where the problem is (file, line,
//! field or tensor) so that a researcher can fix the input without reading our code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PivotError {
    /// A file could not be read, parsed or written.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },

    /// One record of a line- or list-oriented data file is bad.
    #[error("{}:{line}: field `{field}`: {message}", path.display())]
    Record { path: PathBuf, line: usize, field: String, message: String },

    /// A configuration value (config.json, a preset, a trainer config) is missing or invalid.
    #[error("{source_name}: field `{field}`: {message}")]
    Config { source_name: String, field: String, message: String },

    /// A checkpoint lacks a tensor the model needs.
    #[error("{}: tensor `{name}` is missing (the model expects shape {expected:?})", path.display())]
    MissingTensor { path: PathBuf, name: String, expected: Vec<i64> },

    /// A checkpoint tensor has the wrong shape.
    #[error("{}: tensor `{name}` has shape {found:?}, the model expects {expected:?}", path.display())]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<i64>, found: Vec<i64> },

    /// Input that does not fit what an operation needs (shapes, lengths, empty data sets).
    #[error("{0}")]
    Invalid(String),

    /// The user asked the run to stop (Ctrl-C, Jupyter interrupt). State is intact.
    #[error("interrupted by the user at {at}; the model keeps its state as of that point")]
    Interrupted { at: String },

    /// A loss or gradient became NaN/Inf. The model keeps the last good state.
    #[error("non-finite {what} at step {step}; the run stopped and the model keeps the weights of step {last_good}")]
    NonFinite { what: String, step: usize, last_good: usize },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = PivotError> = std::result::Result<T, E>;

impl PivotError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        PivotError::File { path: path.into(), message: message.to_string() }
    }
    pub fn config(source_name: impl Into<String>, field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        PivotError::Config { source_name: source_name.into(), field: field.into(), message: message.to_string() }
    }
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        PivotError::Invalid(message.to_string())
    }
}
