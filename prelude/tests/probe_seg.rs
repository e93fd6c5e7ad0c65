//! Segmentation probe metrics against hand-computed confusion matrices, and training sanity.

use pivot::prelude::*;

fn t(v: &[i64]) -> Tensor {
    Tensor::from_slice(v)
}

#[test]
fn miou_hand_computed_with_absent_class_and_ignore() {
    // gt/pred pairs on valid pixels: (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel (pred 3) is ignored.
    let gt = t(&[0, 0, 1, 1, 255, 2]).view([2, 3]);
    let pred = t(&[0, 1, 1, 1, 3, 0]).view([2, 3]);
    let mut cm = ConfusionMatrix::new(4);
    cm.update(&pred, &gt, Some(255));
    assert_eq!(cm.counts, vec![1, 1, 0, 0, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let iou = cm.iou();
    assert!((iou[0] - 1.0 / 3.0).abs() < 1e-12); // I=1, U=2+2-1
    assert!((iou[1] - 2.0 / 3.0).abs() < 1e-12); // I=2, U=2+3-2
    assert_eq!(iou[2], 0.0); // in gt, never predicted
    assert!(iou[3].is_nan()); // only "predicted" on an ignored pixel → absent
    assert!((cm.miou() - 1.0 / 3.0).abs() < 1e-12);
    assert!((cm.pixel_accuracy() - 3.0 / 5.0).abs() < 1e-12);
    // Accumulating a second batch adds counts (whole-val-set mIoU, not a mean of per-image mIoUs).
    cm.update(&t(&[3]), &t(&[3]), Some(255));
    assert!((cm.iou()[3] - 1.0).abs() < 1e-12);
    assert!((cm.miou() - (1.0 / 3.0 + 2.0 / 3.0 + 0.0 + 1.0) / 4.0).abs() < 1e-12);
}

#[test]
fn patch_labels_union_and_majority() {
    // 4×4 mask, patch 2 → 2×2 patches. Class 0 = unlabeled.
    #[rustfmt::skip]
    let mask = Tensor::from_slice(&[
        0u8, 0, 1, 1,
        0,   0, 1, 2,
        0,   3, 2, 2,
        3,   3, 2, 255,
    ]).view([1, 4, 4]);
    let counts = patch_class_counts(&mask, 2, 4).unwrap();
    assert_eq!(counts.size(), vec![1, 4, 4]);
    let c: Vec<i64> = Vec::try_from(&counts.reshape([-1])).unwrap();
    assert_eq!(c, vec![4, 0, 0, 0, /**/ 0, 3, 1, 0, /**/ 1, 0, 0, 3, /**/ 0, 0, 3, 0]);
    let u: Vec<f32> = Vec::try_from(&union_targets(&counts, Some(0)).reshape([-1])).unwrap();
    // patch 0: only unlabeled → kept; patch 2: unlabeled + class 3 → unlabeled dropped.
    assert_eq!(u, vec![1., 0., 0., 0., /**/ 0., 1., 1., 0., /**/ 0., 0., 0., 1., /**/ 0., 0., 1., 0.]);
    let m: Vec<i64> = Vec::try_from(&majority_targets(&counts).reshape([-1])).unwrap();
    assert_eq!(m, vec![0, 1, 3, 2]);
    assert!(patch_class_counts(&mask, 3, 4).is_err());
}

#[test]
fn union_metrics_hand_computed() {
    // 4 patches × 3 classes.
    let target = Tensor::from_slice(&[1i64, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0]).view([4, 3]);
    let pred = Tensor::from_slice(&[1i64, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]).view([4, 3]);
    let mut b = BinaryConfusions::new(3, true);
    b.update_multilabel(&pred, &target);
    // class 0: tp 1 fn 1 fp 1 tn 1; class 1: tp 1 fn 1 fp 0 tn 2; class 2: never positive.
    assert_eq!((b.tp.clone(), b.fp.clone(), b.fn_.clone(), b.tn.clone()), (vec![1, 1, 0], vec![1, 0, 0], vec![1, 1, 0], vec![1, 2, 4]));
    let m = b.metrics();
    assert_eq!(m.classes_present, 2);
    assert!((m.macro_recall - 0.5).abs() < 1e-12);
    assert!((m.macro_precision - 0.75).abs() < 1e-12);
    let f1 = |p: f64, r: f64| 2.0 * p * r / (p + r + 1e-6);
    assert!((m.macro_f1 - (f1(0.5, 0.5) + f1(1.0, 0.5)) / 2.0).abs() < 1e-12);
    assert!((m.macro_accuracy - (0.5 + 0.75) / 2.0).abs() < 1e-12);
    assert!((m.micro_accuracy - 9.0 / 12.0).abs() < 1e-12);
}

#[test]
fn majority_metrics_hand_computed() {
    // Targets with an ignored patch (-100) and a class (3) that is predicted but never true.
    let target = t(&[0, 0, 1, 2, -100, 1]);
    let pred = t(&[0, 1, 1, 3, 2, 1]);
    let mut b = BinaryConfusions::new(4, false);
    b.update_single(&pred, &target);
    let m = b.metrics();
    // class 0: tp1 fn1 → R .5 P 1; class 1: tp2 fp1 → R 1 P 2/3; class 2: tp0 fn1 → R 0 P 0.
    assert_eq!(m.classes_present, 3);
    assert!((m.macro_recall - 0.5).abs() < 1e-12);
    assert!((m.macro_precision - (1.0 + 2.0 / 3.0 + 0.0) / 3.0).abs() < 1e-12);
    assert!((m.micro_accuracy - 3.0 / 5.0).abs() < 1e-12);
    let mut cm = ConfusionMatrix::new(4);
    cm.update(&pred, &target, None);
    assert_eq!(cm.patch_metrics(), m);
}

#[test]
fn schedule_matches_timm() {
    assert_eq!(cosine_warmup_lr(0, 1000, 500, 1e-3, 1e-4), 0.0);
    assert!((cosine_warmup_lr(250, 1000, 500, 1e-3, 1e-4) - 5e-4).abs() < 1e-15);
    // After warmup the cosine runs on the absolute step (timm warmup_prefix=False).
    let lr = cosine_warmup_lr(500, 1000, 500, 1e-3, 1e-4);
    assert!((lr - (1e-4 + 0.5 * 9e-4)).abs() < 1e-12);
}

/// Tokens that encode the patch class (one-hot direction + noise), masks with blocky classes.
fn synthetic(n: i64, seed: i64) -> (Tensor, Tensor) {
    let grid = 4;
    let p = 4;
    let d = 16;
    // The class directions are the "encoder": shared by train and val.
    tch::manual_seed(100);
    let dirs = Tensor::randn([4, d], (Kind::Float, Device::Cpu)) * 3.0;
    tch::manual_seed(seed);
    let classes = Tensor::randint(4, [n, grid, grid], (Kind::Int64, Device::Cpu));
    let masks = classes.repeat_interleave_self_int(p, Some(1), None).repeat_interleave_self_int(p, Some(2), None).to_kind(Kind::Uint8);
    let tokens = dirs.index_select(0, &classes.reshape([-1])).view([n, grid * grid, d])
        + Tensor::randn([n, grid * grid, d], (Kind::Float, Device::Cpu)) * 0.3;
    (tokens, masks)
}

#[test]
fn patch_seg_probe_learns_separable_tokens() {
    let (xt, mt) = synthetic(64, 0);
    let (xv, mv) = synthetic(32, 1);
    for (labels, head) in [(PatchLabels::Majority, SegHead::Linear), (PatchLabels::Union, SegHead::Mlp { hidden: 32 })] {
        let probe = PatchSegProbe {
            labels,
            head,
            unlabeled: None,
            batch_size: 8,
            epochs: 6,
            warmup_steps: 5,
            lr: 1e-2,
            min_lr: 1e-3,
            ..PatchSegProbe::new(4)
        };
        let rep = probe.fit_tokens(&xt, &mt, &xv, &mv).unwrap();
        println!("{rep}");
        assert_eq!(rep.epochs.len(), 6);
        assert!(rep.best.macro_recall > 0.95, "{labels:?}: {:?}", rep.best);
        assert!(rep.train_loss.last().unwrap() < &rep.train_loss[0]);
        let again = probe.fit_tokens(&xt, &mt, &xv, &mv).unwrap();
        assert_eq!(again.best, rep.best, "deterministic for a seed");
    }
}

#[test]
fn dense_probe_learns_and_scores_miou() {
    let (xt, mt) = synthetic(64, 2);
    let (xv, mv) = synthetic(16, 3);
    // Mark a border of val pixels as ignore: they must not count.
    let mv = mv.copy();
    let _ = mv.narrow(1, 0, 1).fill_(255);
    let probe = DenseSegProbe { epochs: 8, lr: 1e-2, warmup_steps: 5, ..DenseSegProbe::new(4) };
    let rep = probe.fit_tokens(&xt, &mt, &xv, &mv).unwrap();
    println!("{rep}");
    let valid = mv.ne(255).sum(Kind::Int64).int64_value(&[]) as u64;
    assert_eq!(rep.confusion.counts.iter().sum::<u64>(), valid);
    assert!(rep.miou > 0.7, "mIoU {}", rep.miou);
    assert!(rep.pixel_accuracy > rep.miou - 0.2);
    let pred = rep.head.predict(&xv.narrow(0, 0, 2), (16, 16));
    assert_eq!(pred.size(), vec![2, 16, 16]);
}
