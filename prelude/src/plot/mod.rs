//! Figures (plotters → PNG + SVG, no system fonts), result tables (`Runs`, polars) and how a
//! tensor shows itself in a cell.

pub mod charts;
pub mod figure;
pub mod html;
pub mod table;
pub mod tensor;

pub use charts::{
    BarGroup, Series, bars, colorize_labels, curves, heatmap, image_grid, seg_comparison, seg_comparison_models, seg_palette,
    series_color,
};
pub use figure::Figure;
pub use table::{Metrics, RunRecord, Runs};
pub use tensor::tensor_repr;
