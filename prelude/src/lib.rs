//! `pivot` — the PIVOT Lab prelude.
//!
//! Typed primitives for the study "RL makes MLLMs see better than SFT" (Song et al., 2025):
//! Hugging Face compatible vision towers, projector and Qwen2 language model assembled into an
//! MLLM (`model`), an offline data world and real-format loaders (`data`), SFT and DPO trainers
//! with the tower unfrozen (`train`), linear and segmentation probes (`probe`), gradient maps,
//! Platonic alignment and the study's statistics (`analysis`), plots and tables (`plot`). `use pivot::prelude::*;` brings in
//! everything a notebook cell needs.

pub mod error;
pub mod device;
pub mod data;
pub mod model;
pub mod runtime;
pub mod probe;
pub mod analysis;
pub mod plot;
pub mod train;

pub use error::{PivotError, Result};

/// Everything a notebook cell or REPL line needs, in one import.
pub mod prelude {
    pub use crate::device::{cuda_available, cuda_if_available};
    pub use crate::data::*;
    pub use crate::error::{PivotError, Result};
    pub use crate::model::*;
    pub use crate::runtime::{
        check_interrupt, clear_interrupt, clear_output, display, input, input_password, interrupt_requested, show,
        DisplayHandle,
        EvcxrDisplay, MimeBundle, Progress, Rich,
    };
    pub use crate::{probe::*, analysis::*, plot::*};
    pub use crate::train::*;
    pub use tch::{self, Device, Kind, Tensor};
    // Re-exported so cells can name `image::RgbImage` and call `image::open` without a `:dep`
    // (a second copy of the crate would make its types incompatible with ours).
    pub use image;
}
