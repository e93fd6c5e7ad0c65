//! The objectives against their formulas, on hand-made tensors and on the tiny MLLM.

use pivot::prelude::*;

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v)
}
fn vals(x: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(x.to_kind(Kind::Double)).unwrap()
}
fn metric(m: &[(String, f64)], k: &str) -> f64 {
    m.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no metric {k}")).1
}
fn logsig(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

#[test]
fn dpo_loss_matches_the_formula() {
    let (pc, pr, rc, rr) = ([-5.0, -3.0, -8.0], [-6.0, -2.0, -8.5], [-5.5, -3.0, -7.0], [-5.5, -2.5, -9.0]);
    let beta = 0.1;
    let terms = dpo_loss(&t(&pc), &t(&pr), &t(&rc), &t(&rr), beta, 0.0);
    let mut want = 0.0;
    let (mut rw, mut rl, mut acc, mut margin) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..3 {
        let z = (pc[i] - pr[i]) as f64 - (rc[i] - rr[i]) as f64;
        want += -logsig(beta * z) / 3.0;
        let (w, l) = (beta * (pc[i] - rc[i]) as f64, beta * (pr[i] - rr[i]) as f64);
        rw += w / 3.0;
        rl += l / 3.0;
        acc += ((w > l) as u8 as f64) / 3.0;
        margin += (w - l) / 3.0;
    }
    assert!((terms.loss.double_value(&[]) - want).abs() < 1e-6, "{} vs {want}", terms.loss.double_value(&[]));
    let m = terms.metrics();
    assert!((metric(&m, "rewards/chosen") - rw).abs() < 1e-6);
    assert!((metric(&m, "rewards/rejected") - rl).abs() < 1e-6);
    assert!((metric(&m, "rewards/accuracies") - acc).abs() < 1e-6);
    assert!((metric(&m, "rewards/margins") - margin).abs() < 1e-6);
    // Pair-wise losses are exposed too.
    assert_eq!(terms.losses.size(), vec![3]);
}

#[test]
fn dpo_loss_at_init_is_ln2_with_zero_rewards() {
    let p = t(&[-12.0, -3.5]);
    let q = t(&[-10.0, -4.0]);
    let terms = dpo_loss(&p, &q, &p, &q, 0.1, 0.0);
    assert!((terms.loss.double_value(&[]) - std::f64::consts::LN_2).abs() < 1e-7);
    let m = terms.metrics();
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"] {
        assert_eq!(metric(&m, k), 0.0, "{k}");
    }
    // Label smoothing leaves z = 0 at ln 2 as well.
    let smoothed = dpo_loss(&p, &q, &p, &q, 0.1, 0.3);
    assert!((smoothed.loss.double_value(&[]) - std::f64::consts::LN_2).abs() < 1e-7);
}

#[test]
fn label_smoothing_mixes_both_directions() {
    let (pc, pr, rc, rr) = (t(&[-1.0, -2.0]), t(&[-4.0, -1.0]), t(&[-2.0, -2.0]), t(&[-2.0, -2.0]));
    let (beta, eps) = (0.5, 0.2);
    let terms = dpo_loss(&pc, &pr, &rc, &rr, beta, eps);
    let zs = [(-1.0 - -4.0) - 0.0, (-2.0 - -1.0) - 0.0];
    let want: f64 = zs.iter().map(|&z: &f64| -(1.0 - eps) * logsig(beta * z) - eps * logsig(-beta * z)).sum::<f64>() / 2.0;
    assert!((terms.loss.double_value(&[]) - want).abs() < 1e-6);
    // Gradient with respect to the policy: d/dπ_w = −β[(1−ε)σ(−βz) − εσ(βz)] / B.
    let pc = pc.set_requires_grad(true);
    let terms = dpo_loss(&pc, &pr, &rc, &rr, beta, eps);
    terms.loss.backward();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let g = vals(&pc.grad());
    for (i, z) in zs.iter().enumerate() {
        let want = -beta * ((1.0 - eps) * sig(-beta * z) - eps * sig(beta * z)) / 2.0;
        assert!((g[i] - want).abs() < 1e-6, "grad {i}: {} vs {want}", g[i]);
    }
}

#[test]
fn cosine_schedule_warms_up_then_decays_to_zero() {
    // 100 steps, ratio 0.03 → 3 warmup steps (HF rounds up).
    assert_eq!(cosine_schedule(0, 100, 0.03), 0.0);
    assert!((cosine_schedule(1, 100, 0.03) - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(cosine_schedule(3, 100, 0.03), 1.0);
    assert!((cosine_schedule(3 + 97 / 2, 100, 0.03) - 0.5).abs() < 0.02);
    assert!(cosine_schedule(99, 100, 0.03) < 1e-3);
    assert_eq!(cosine_schedule(0, 10, 0.0), 1.0);
}

#[test]
fn sft_loss_counts_answer_tokens_only() {
    tch::manual_seed(0);
    let mllm = Mllm::tiny(Device::Cpu);
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, 3);
    let images: Vec<_> = data.iter().map(|s| s.image.load().unwrap()).collect();
    let seqs: Vec<Encoded> = data.iter().map(|s| mllm.encode_chat(&s.question, Some(&s.answer)).unwrap()).collect();
    for (s, e) in data.iter().zip(&seqs) {
        let answer_tokens = mllm.tokenizer().encode(s.answer.trim()).unwrap().len();
        let labelled = e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        assert_eq!(labelled, answer_tokens + 1, "answer tokens plus <|im_end|> carry labels");
    }
    let pixels = mllm.preprocess(&images).unwrap();
    let out = tch::no_grad(|| mllm.forward(&pixels, &seqs, &[0, 1, 2])).unwrap();
    let loss = mllm.answer_loss(&out).unwrap().double_value(&[]);

    // By hand from full logits: mean over labelled targets of −log softmax.
    let logp = mllm.logits(&out).to_kind(Kind::Double).log_softmax(-1, Kind::Double);
    let labels = Vec::<i64>::try_from(out.labels.flatten(0, -1)).unwrap();
    let t_len = out.labels.size()[1] as usize;
    let (mut sum, mut n) = (0.0, 0);
    for b in 0..3 {
        for t in 1..t_len {
            let y = labels[b * t_len + t];
            if y != IGNORE_INDEX {
                sum -= logp.double_value(&[b as i64, t as i64 - 1, y]);
                n += 1;
            }
        }
    }
    assert!((loss - sum / n as f64).abs() < 1e-4, "{loss} vs {}", sum / n as f64);

    // A different question changes only the prompt: the labelled count stays, and the loss is
    // still the mean over answer tokens (perturbing the prompt moves it only through attention).
    let mut masked = seqs.clone();
    for e in &mut masked {
        let k = e.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
        for i in 0..k {
            if e.ids[i] != IMAGE_TOKEN_INDEX {
                e.ids[i] = e.ids[(i + 1) % k].max(0);
            }
        }
    }
    let out2 = tch::no_grad(|| mllm.forward(&pixels, &masked, &[0, 1, 2])).unwrap();
    let (lp1, rows1) = mllm.answer_token_logps(&out).unwrap();
    let (lp2, rows2) = mllm.answer_token_logps(&out2).unwrap();
    assert_eq!(lp1.size(), lp2.size());
    assert!(rows1.equal(&rows2));

    // And labels placed on prompt positions would be counted: the encoder keeps them at −100.
    let mut leaky = seqs.clone();
    leaky[0].labels[1] = leaky[0].ids[1];
    let out3 = tch::no_grad(|| mllm.forward(&pixels, &leaky, &[0, 1, 2])).unwrap();
    assert_eq!(mllm.answer_token_logps(&out3).unwrap().0.size()[0], lp1.size()[0] + 1);
}

#[test]
fn trainer_first_steps_match_the_objectives() {
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    // One step over the whole set: the logged loss is the CE of the untouched model.
    let vqa = world.vqa(Split::Train, 4);
    let mut mllm = Mllm::tiny(Device::Cpu);
    let images: Vec<_> = vqa.iter().map(|s| s.image.load().unwrap()).collect();
    let seqs: Vec<Encoded> = vqa.iter().map(|s| mllm.encode_chat(&s.question, Some(&s.answer)).unwrap()).collect();
    let want = tch::no_grad(|| {
        let out = mllm.forward(&mllm.preprocess(&images).unwrap(), &seqs, &[0, 1, 2, 3]).unwrap();
        mllm.answer_loss(&out).unwrap().double_value(&[])
    });
    let cfg = TrainConfig::default().batch_size(4).max_steps(1).quiet();
    let log = SftTrainer::new(cfg).run(&mut mllm, &vqa).unwrap();
    assert!((log.get("loss")[0] - want).abs() < 1e-4, "{} vs {want}", log.get("loss")[0]);
    assert_eq!(mllm.provenance.stage, Stage::Sft);

    // DPO's first step: policy = reference → ln 2 and zero rewards, for every encoding mode.
    let prefs = world.preferences(Split::Train, 4);
    let mut first = Vec::new();
    for (double, cached) in [(false, false), (true, false), (false, true)] {
        tch::manual_seed(1);
        let mut m = Mllm::tiny(Device::Cpu);
        let cfg = DpoConfig {
            double_encoding: double,
            cached_reference: cached,
            train: TrainConfig::default().batch_size(4).max_steps(1).quiet(),
            ..Default::default()
        };
        let log = DpoTrainer::new(cfg).run(&mut m, &prefs).unwrap();
        let row = log.last().unwrap();
        assert!((row.get("loss").unwrap() - std::f64::consts::LN_2).abs() < 1e-4);
        assert!(row.get("rewards/margins").unwrap().abs() < 1e-4);
        for k in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "samples_per_second", "tokens_per_second"] {
            assert!(row.get(k).is_some(), "missing {k}");
        }
        first.push((row.get("logps/chosen").unwrap(), row.get("logps/rejected").unwrap(), row.get("grad_norm").unwrap()));
        assert_eq!(m.provenance.stage, Stage::Dpo);
    }
    // One or two encodings: the same log-probs and the same gradient.
    for f in &first[1..] {
        assert!((f.0 - first[0].0).abs() < 1e-3 && (f.1 - first[0].1).abs() < 1e-3, "{first:?}");
        assert!((f.2 - first[0].2).abs() < 1e-3 * first[0].2.max(1.0), "{first:?}");
    }
}

#[test]
fn vqa_normalisation() {
    assert_eq!(normalize_answer("  The circle is RED. "), "the circle is red");
    assert_eq!(normalize_answer("There are 3 shapes!"), normalize_answer("there are 3 shapes"));
    assert_ne!(normalize_answer("red"), normalize_answer("blue"));
}
