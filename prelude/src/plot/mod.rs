//! Figures (plotters → PNG + SVG, no system fonts: curves, bars, heat maps, forest plots, image
//! grids), result tables (`Runs`, polars) and how a tensor shows itself in a cell. Draws from plain
//! numbers: imports nothing from model/, train/, probe/ or analysis/.

pub mod charts;
pub mod figure;
pub mod forest;
pub mod html;
pub mod table;
pub mod tensor;

pub use charts::{
    BarGroup, Series, bars, colorize_labels, curves, heatmap, image_grid, seg_comparison, seg_comparison_models, seg_palette,
    series_color,
};
pub use figure::Figure;
pub use forest::{ForestPlot, ForestRow};
pub use table::{Metrics, RunRecord, Runs};
pub use tensor::tensor_repr;
