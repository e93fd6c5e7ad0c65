//! Figures (plotters → PNG + SVG, no system fonts) and result tables (`Runs`, polars).

pub mod charts;
pub mod figure;
pub mod reports;
pub mod table;

pub use charts::{
    BarGroup, Series, bars, colorize_labels, curves, heatmap, image_grid, seg_comparison, seg_comparison_models, seg_palette,
    series_color,
};
pub use figure::Figure;
pub use table::{Metrics, RunRecord, Runs};
