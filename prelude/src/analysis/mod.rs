//! Analyses of vision encoders: Platonic alignment (mutual k-NN, CKA, CKNNA over layer × layer
//! grids), gradient maps (PIVOT's token-gradient map, Grad-CAM, overlays, localisation scores),
//! two-way multiple-choice VQA on preference pairs, and the study's statistics (paired DPO − SFT
//! comparisons over seeds: intervals, tests, Holm, equivalence, verdicts, power).

pub mod align;
pub mod choice;
pub mod gradmap;
pub mod maps;
pub mod platonic;
pub mod stats;

pub use align::{
    AlignmentGrid, AlignmentMetric, OutlierClamp, cka, cknna, hsic_biased, hsic_unbiased, l2_normalize, mutual_knn,
    prepare_features, remove_outliers,
};
pub use choice::{ChoiceEval, ChoiceReport, ImageUse};
pub use gradmap::{
    GradMapOptions, LocalisationScore, TokenNorm, border_fix, colorize, energy_in_mask, grad_cam, jet, localisation,
    mask_outline, min_max, overlay, overlay_with, pivot_map, pointing_game, tensor_to_rgb,
};
pub use maps::{
    AsGradInput, DpoCopy, GradInput, GradMap, GradMapResult, LocalisationRow, LocalisationSample, MapMethod, MaskTarget,
    Objective, localisation_row, localisation_score, shapes_localisation_set,
};
pub use platonic::{Alignment, language_features};
pub use stats::{
    Equivalence, Interval, MeasureResult, PairedComparison, PairedTPower, StudyOptions, StudyTable, Verdict, Wilcoxon,
    WilcoxonMethod, bootstrap_means, holm_adjust, holm_interval_alphas, noncentral_t_cdf, percentile,
    wilcoxon_signed_rank,
};
