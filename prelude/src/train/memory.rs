//! Memory arithmetic of a training step: what each rank holds, per component, for a vision
//! tower (SigLIP family) and a Qwen2 LM, from their configs. It answers "does this pair fit on
//! that GPU at W ranks with ZeRO-1" before a GPU is rented; `docs/memory.md` prints its tables and
//! derives the formulas. A count, not a measurement: allocator slack, CUDA context (≈ 0.5 GiB),
//! temporaries of the optimizer step and fragmentation come on top (see the doc for what a GPU
//! run must measure).
//!
//! ```
//! use pivot::model::{Qwen2Config, VisionConfig};
//! use pivot::train::memory::{MemorySetup, estimate};
//! let tower = VisionConfig::preset("siglip2-so400m-patch16-384").unwrap();
//! let lm = Qwen2Config::preset("qwen2.5-0.5b").unwrap();
//! println!("{}", estimate(&tower, &lm, &MemorySetup::default()));
//! ```

use crate::model::{Qwen2Config, VisionConfig, VisionFamily};
use std::fmt;

/// Parameter counts of one MLLM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    pub tower: i64,
    pub projector: i64,
    pub lm: i64,
    /// Tower parameters the loss reaches (PIVOT/LLaVA feed hidden state −2 to the projector:
    /// the last layer, the final norm and SigLIP's pooling head get no gradient and no
    /// optimizer state).
    pub tower_reached: i64,
}

impl ParamCounts {
    pub fn total(&self) -> i64 {
        self.tower + self.projector + self.lm
    }
}

/// Parameters of a SigLIP-family tower (`use_head` adds the attention-pooling head) and how many
/// of them feed hidden state `select_layer` (negative: from the end, −1 the last layer).
pub fn siglip_params(t: &VisionConfig, select_layer: i64) -> (i64, i64) {
    let (d, i, l) = (t.hidden_size, t.intermediate_size, t.num_hidden_layers);
    let patches = (t.image_size / t.patch_size).pow(2);
    let embeddings = t.num_channels * t.patch_size * t.patch_size * d + d + patches * d;
    let mlp = d * i + i + i * d + d;
    let layer = 2 * 2 * d + 4 * (d * d + d) + mlp;
    let norm = 2 * d;
    let head = if t.use_head { d + 3 * d * d + 3 * d + d * d + d + 2 * d + mlp } else { 0 };
    // hidden_states[0] is the embedding output, [k] the output of layer k.
    let used_layers = if select_layer < 0 { l + 1 + select_layer } else { select_layer }.clamp(0, l);
    let reached = embeddings + used_layers * layer + if used_layers == l { norm + head } else { 0 };
    (embeddings + l * layer + norm + head, reached)
}

/// Parameters of a Qwen2 decoder (q/k/v with bias, o and the MLP without; tied or own head).
pub fn qwen2_params(c: &Qwen2Config) -> i64 {
    let (h, v, i) = (c.hidden_size, c.vocab_size, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let layer = 2 * h + (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * i;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    v * h + c.num_hidden_layers * layer + h + head
}

/// The LLaVA projector: Linear(tower → LM) + GELU + Linear(LM → LM), with biases.
pub fn projector_params(tower_hidden: i64, lm_hidden: i64) -> i64 {
    tower_hidden * lm_hidden + lm_hidden + lm_hidden * lm_hidden + lm_hidden
}

pub fn param_counts(tower: &VisionConfig, lm: &Qwen2Config, select_layer: i64) -> ParamCounts {
    let (t, reached) = siglip_params(tower, select_layer);
    ParamCounts { tower: t, projector: projector_params(tower.hidden_size, lm.hidden_size), lm: qwen2_params(lm), tower_reached: reached }
}

/// What a step trains and on what.
#[derive(Clone, Debug, PartialEq)]
pub struct MemorySetup {
    /// Samples (SFT) or pairs (DPO) per micro-batch on each rank (PIVOT: 1 pair × 32 accumulation).
    pub micro_batch: i64,
    /// DPO: two sequences (and two images, as for image-counterfactual pairs) per pair.
    pub dpo: bool,
    /// DPO against a frozen copy of the model held in memory (false: cached reference log-probs).
    pub online_reference: bool,
    /// Text tokens per sequence besides the image's tokens.
    pub text_tokens: i64,
    /// Bytes per weight, gradient and activation element (2: bf16; 4: fp32, then no master copy).
    pub weight_bytes: i64,
    pub train_tower: bool,
    /// Hidden state of the tower fed to the projector (PIVOT: −2).
    pub select_layer: i64,
    /// Fused attention (flash / memory-efficient SDPA) keeps no seq² attention matrix.
    pub fused_attention: bool,
    /// ZeRO-1 ranks to show side by side.
    pub ranks: Vec<i64>,
}

impl Default for MemorySetup {
    fn default() -> Self {
        MemorySetup {
            micro_batch: 1,
            dpo: true,
            online_reference: true,
            text_tokens: 512,
            weight_bytes: 2,
            train_tower: true,
            select_layer: -2,
            fused_attention: true,
            ranks: vec![1, 2, 8],
        }
    }
}

/// One line of the estimate: bytes per rank at each entry of `MemorySetup::ranks`.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryRow {
    pub component: String,
    pub formula: String,
    pub bytes: Vec<f64>,
}

/// Per-rank memory of one training step, by component.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    pub title: String,
    pub params: ParamCounts,
    /// Parameters with gradients and optimizer state.
    pub trained: i64,
    pub ranks: Vec<i64>,
    pub rows: Vec<MemoryRow>,
}

impl MemoryEstimate {
    pub fn row(&self, component: &str) -> Option<&MemoryRow> {
        self.rows.iter().find(|r| r.component == component)
    }
}

/// Bytes of activations a layer keeps for backward, per sequence (without checkpointing), with
/// `e` bytes per element: the inputs of both norms and of every matmul, the attention output,
/// the MLP's intermediates, and either the log-sum-exp of fused attention or the softmax matrix.
fn decoder_layer_activations(c: &Qwen2Config, s: i64, e: i64, fused: bool) -> i64 {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let attention = if fused { 4 * c.num_attention_heads * s } else { e * c.num_attention_heads * s * s };
    e * s * (4 * h + q + 2 * kv + q + 4 * i) + attention
}

fn tower_layer_activations(t: &VisionConfig, n: i64, e: i64, fused: bool) -> i64 {
    let (d, i) = (t.hidden_size, t.intermediate_size);
    let attention = if fused { 4 * t.num_attention_heads * n } else { e * t.num_attention_heads * n * n };
    e * n * (4 * d + 3 * d + d + 2 * i) + attention
}

/// The estimate for `tower` (SigLIP family) + `lm` under `setup`.
pub fn estimate(tower: &VisionConfig, lm: &Qwen2Config, setup: &MemorySetup) -> MemoryEstimate {
    assert!(matches!(tower.family, VisionFamily::Siglip), "memory::estimate counts SigLIP-family towers");
    let p = param_counts(tower, lm, setup.select_layer);
    let e = setup.weight_bytes;
    let trained = p.lm + p.projector + if setup.train_tower { p.tower_reached } else { 0 };
    let patches = (tower.image_size / tower.patch_size).pow(2);
    let seqs = setup.micro_batch * if setup.dpo { 2 } else { 1 };
    let s = patches + setup.text_tokens;
    let fused = setup.fused_attention;
    let used_layers = (p.tower_reached > 0).then(|| {
        let l = tower.num_hidden_layers;
        if setup.select_layer < 0 { l + 1 + setup.select_layer } else { setup.select_layer }.clamp(0, l)
    });
    let used_layers = used_layers.unwrap_or(0);
    let each = |b: f64| setup.ranks.iter().map(|_| b).collect::<Vec<_>>();
    let sharded = |b: f64| setup.ranks.iter().map(|w| b / *w as f64).collect::<Vec<_>>();
    let row = |component: &str, formula: String, bytes: Vec<f64>| MemoryRow { component: component.into(), formula, bytes };
    let mut rows = vec![
        row("weights", format!("{e}·P"), each((e * p.total()) as f64)),
        row("gradients", format!("{e}·P_t"), each((e * trained) as f64)),
        row("fp32 master", if e == 4 { "0 (the weights are fp32)".into() } else { "4·P_t / W".into() }, sharded(if e == 4 { 0.0 } else { (4 * trained) as f64 })),
        row("AdamW moments", "8·P_t / W".into(), sharded((8 * trained) as f64)),
        row(
            "DPO reference",
            if setup.dpo && setup.online_reference { format!("{e}·P") } else { "0".into() },
            each(if setup.dpo && setup.online_reference { (e * p.total()) as f64 } else { 0.0 }),
        ),
    ];
    // Activations of the tower's layers the projector reads (a frozen tower keeps none), the
    // projector (its two inputs and the GELU's), the LM's layers, and the logits the loss reads
    // (bf16 logits + their fp32 log-softmax).
    let tower_act = if setup.train_tower { used_layers * tower_layer_activations(tower, patches, e, fused) + e * patches * tower.hidden_size } else { 0 };
    let projector_act = e * patches * (tower.hidden_size + 2 * lm.hidden_size);
    let lm_layer = decoder_layer_activations(lm, s, e, fused);
    let logits = (e + 4) * s * lm.vocab_size;
    let full = seqs * (tower_act + projector_act + lm.num_hidden_layers * lm_layer + logits);
    // Checkpointing every layer: each layer's input stays, one layer's activations are
    // recomputed (and held) at a time.
    let tower_ckpt = if setup.train_tower { used_layers * e * patches * tower.hidden_size + tower_layer_activations(tower, patches, e, fused) } else { 0 };
    let lm_ckpt = lm.num_hidden_layers * e * s * lm.hidden_size + lm_layer;
    let ckpt = seqs * (tower_ckpt + projector_act + lm_ckpt + logits);
    let attn = if fused { "4·a·s (fused attention)" } else { "e·a·s² (softmax)" };
    rows.push(row(
        "activations",
        format!("b·[L_v·(e·n·(8d_v + 2I_v) + {attn}) + L·(e·s·(4h + 2q + 2kv + 4I) + {attn}) + (e+4)·s·V]"),
        each(full as f64),
    ));
    rows.push(row("activations, checkpointed", "b·[L_v·e·n·d_v + L·e·s·h + one layer + (e+4)·s·V]".into(), each(ckpt as f64)));
    let states = ["weights", "gradients", "fp32 master", "AdamW moments", "DPO reference"];
    let sum = |extra: &str| -> Vec<f64> {
        (0..setup.ranks.len()).map(|k| rows.iter().filter(|r| states.contains(&r.component.as_str()) || r.component == extra).map(|r| r.bytes[k]).sum()).collect()
    };
    let (total, total_ckpt) = (sum("activations"), sum("activations, checkpointed"));
    rows.push(row("total", "states + activations".into(), total));
    rows.push(row("total, checkpointed", "states + checkpointed activations".into(), total_ckpt));
    let objective = if setup.dpo { format!("DPO, {} pair(s)", setup.micro_batch) } else { format!("SFT, {} sample(s)", setup.micro_batch) };
    MemoryEstimate {
        title: format!(
            "{} + {}: P = {:.3} B ({} tower, {} projector, {} LM), P_t = {:.3} B trained; {objective} per micro-batch, s = {s} tokens ({patches} image + {} text), {} weights",
            tower.name,
            lm.name,
            p.total() as f64 / 1e9,
            p.tower,
            p.projector,
            p.lm,
            trained as f64 / 1e9,
            setup.text_tokens,
            if e == 2 { "bf16" } else { "fp32" }
        ),
        params: p,
        trained,
        ranks: setup.ranks.clone(),
        rows,
    }
}

impl fmt::Display for MemoryEstimate {
    /// A Markdown table, GiB per rank.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}\n", self.title)?;
        write!(f, "| component | bytes per rank |")?;
        for w in &self.ranks {
            write!(f, " W={w} GiB |")?;
        }
        writeln!(f)?;
        write!(f, "|---|---|")?;
        for _ in &self.ranks {
            write!(f, "---:|")?;
        }
        writeln!(f)?;
        for r in &self.rows {
            write!(f, "| {} | {} |", r.component, r.formula)?;
            for b in &r.bytes {
                write!(f, " {:.2} |", b / (1u64 << 30) as f64)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Totals that the published checkpoints report (HF model cards / safetensors headers).
    #[test]
    fn parameter_counts_match_the_published_models() {
        for (name, want) in [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-3b", 3_085_938_688), ("qwen2.5-7b", 7_615_616_512)] {
            assert_eq!(qwen2_params(&Qwen2Config::preset(name).unwrap()), want, "{name}");
        }
        // SigLIP So400m's vision tower: 428 M with its pooling head.
        let (all, reached) = siglip_params(&VisionConfig::preset("siglip2-so400m-patch16-384").unwrap(), -2);
        assert_eq!(all, 428_256_704);
        assert!(reached < all && all - reached > 15_000_000, "the last layer and the head are not reached");
    }

    /// The tiny MLLM by hand: tower d 96, I 384, 4 layers, 64 px / 8 px patches, no head; LM
    /// vocab V, h 128, I 352, 4 layers, 4 heads of 32, 2 KV heads, tied; projector 96 → 128 → 128.
    #[test]
    fn tiny_model_by_hand_and_by_its_variables() {
        let m = crate::model::Mllm::tiny(tch::Device::Cpu);
        let lm_cfg = Qwen2Config::tiny(m.tokenizer().vocab_size() as i64);
        let v = lm_cfg.vocab_size;
        let tower = (3 * 8 * 8 * 96 + 96 + 64 * 96) + 4 * (4 * 96 + 4 * (96 * 96 + 96) + (96 * 384 + 384 + 384 * 96 + 96)) + 2 * 96;
        let projector = 96 * 128 + 128 + 128 * 128 + 128;
        let lm = v * 128 + 4 * (2 * 128 + (128 * 128 + 128) + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 352) + 128;
        let c = param_counts(&VisionConfig::tiny(), &lm_cfg, -2);
        assert_eq!((c.tower, c.projector, c.lm), (tower, projector, lm));
        let count = |vs: &tch::nn::VarStore| vs.variables().values().map(|t| t.numel() as i64).sum::<i64>();
        assert_eq!((count(m.tower.var_store()), count(m.projector.var_store()), count(m.lm.var_store())), (tower, projector, lm));
        // Layer 4's 4·96 + 4·(96² + 96) + MLP and the final norm feed nothing at select_layer −2.
        assert_eq!(c.tower - c.tower_reached, 4 * 96 + 4 * (96 * 96 + 96) + (96 * 384 + 384 + 384 * 96 + 96) + 2 * 96);
    }

    #[test]
    fn zero1_divides_master_and_moments_by_the_ranks() {
        let e = estimate(&VisionConfig::tiny(), &Qwen2Config::tiny(1000), &MemorySetup { ranks: vec![1, 2, 8], ..MemorySetup::default() });
        let pt = e.trained as f64;
        assert_eq!(e.row("AdamW moments").unwrap().bytes, vec![8.0 * pt, 4.0 * pt, pt]);
        assert_eq!(e.row("fp32 master").unwrap().bytes, vec![4.0 * pt, 2.0 * pt, 0.5 * pt]);
        let (w, t) = (e.row("weights").unwrap().bytes[0], e.row("total").unwrap());
        assert!(t.bytes[0] > t.bytes[2] && t.bytes[2] > 2.0 * w, "{e}");
        let ck = e.row("activations, checkpointed").unwrap().bytes[0];
        assert!(ck < e.row("activations").unwrap().bytes[0], "{e}");
    }
}
