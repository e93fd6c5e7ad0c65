//! Probes on frozen features: the CLIP logistic-regression protocol, the DINOv2 SGD linear head,
//! patch-seg and a dense linear segmentation probe.
//!
//! Everything here works on tensors (features [N, D], patch tokens [N, h·w, D], masks [N, H, W]),
//! on CPU or CUDA, deterministically for a given seed. Feature extraction from an encoder sits on
//! top of these functions (`fit_features` / `fit_tokens`).

mod encoder;
pub mod features;
pub mod lbfgs;
pub mod linear;
pub mod logreg;
pub mod seg;

pub use encoder::{
    EncoderProbeReport, FeatureSpec, Keyed, OnFeatures, SegMethod, SegProbe, SegProbeReport, SegResult, default_pooling,
};
pub use features::{
    FeatureCache, FeatureExtractor, Features, Fingerprint, ImageSet, default_cache_dir, extract_features, mask_tensor,
    preprocess_mask, tower_fingerprint,
};
pub use lbfgs::{LbfgsInfo, LbfgsOptions};
pub use linear::{
    CSearch, FeatureSet, LinearProbe, ProbeReport, SgdLinearProbe, Standardizer, SweepPoint, confusion_matrix,
    topk_accuracy,
};
pub use logreg::LogisticRegression;
pub use seg::{
    BinaryConfusions, ConfusionMatrix, DenseSegHead, DenseSegProbe, DenseSegReport, PatchLabels, PatchSegMetrics,
    PatchSegProbe, PatchSegReport, SegHead, cosine_warmup_lr, majority_targets, patch_class_counts, union_targets,
};
