"""Builds small random Hugging Face models with `transformers` and records reference outputs.

The Rust parity tests (prelude/tests/model_parity.rs) load each model directory with our own
loaders, feed the same inputs and compare every hidden state and the logits.

Every parameter — LayerNorm scales and biases included — is drawn at random, so that a
transposed weight, a missing bias or a wrong norm cannot hide behind HF's ones/zeros init.
Sizes are deliberately odd (head dims 12 and 8, GQA ratio 3, 5×5 and 4×4 patch grids).

Usage: python make_parity_fixtures.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

torch.manual_seed(1234)


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def save_reference(out_dir, tensors):
    save_file({k: v.detach().clone().contiguous().float() if v.is_floating_point() else v.clone().contiguous()
               for k, v in tensors.items()}, os.path.join(out_dir, "reference.safetensors"))


def vision_fixture(out, name, model, image_size, dtype=None):
    d = os.path.join(out, name)
    pixels = torch.randn(2, 3, image_size, image_size)
    if dtype is not None:
        # The file is stored in `dtype`; the reference is what those rounded weights give in f32.
        model = model.to(dtype).float()
        model.save_pretrained(d, safe_serialization=True)
        from safetensors.torch import load_file
        sd = load_file(os.path.join(d, "model.safetensors"))
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        model.save_pretrained(d, safe_serialization=True)
    with torch.no_grad():
        o = model(pixel_values=pixels, output_hidden_states=True)
    ref = {"pixel_values": pixels, "last_hidden_state": o.last_hidden_state}
    if o.pooler_output is not None:
        ref["pooler_output"] = o.pooler_output
    for i, h in enumerate(o.hidden_states):
        ref[f"hidden_states.{i}"] = h
    save_reference(d, ref)
    return model


def train_tokenizer(out_dir):
    """A small byte-level BPE with the ChatML specials, saved as tokenizer.json (+ HF files)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The red square is left of the blue circle.",
        "How many shapes are there? There are three shapes.",
        "You are a helpful assistant.",
        "What colour is the large triangle? The large triangle is green.",
    ] * 20
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return fast


def qwen_fixture(out, name, cfg, tokenizer, shard=False):
    d = os.path.join(out, name)
    model = randomise(Qwen2ForCausalLM(cfg))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True, max_shard_size="40KB" if shard else "5GB")
    tokenizer.backend_tokenizer.save(os.path.join(d, "tokenizer.json"))
    ids = torch.randint(3, cfg.vocab_size, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding on the second row
    ids[1, 8:] = 0
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ref = {"input_ids": ids, "attention_mask": mask, "logits": o.logits}
    for i, h in enumerate(o.hidden_states):
        ref[f"hidden_states.{i}"] = h
    # Greedy continuation of the first row (reference for generation with the KV cache).
    with torch.no_grad():
        gen = model.generate(input_ids=ids[:1, :6], attention_mask=mask[:1, :6], max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    ref["generate_prompt"] = ids[:1, :6]
    ref["generate_output"] = gen[:, 6:]
    save_reference(d, ref)
    return model


def mllm_fixture(out, tower_dir, tower, lm_dir, lm):
    """A PIVOT-layout MLLM: SigLIP tower without its last layer, mlp2x_gelu projector, Qwen2.

    The reference splices projected tokens of hidden_states[-2] at the placeholder and runs the
    LM on inputs_embeds: LLaVA's prepare_inputs_labels_for_multimodal, written out by hand."""
    d = os.path.join(out, "pivot_mllm")
    os.makedirs(d, exist_ok=True)
    dv = tower.config.hidden_size
    dl = lm.config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(dv, dl), torch.nn.GELU(), torch.nn.Linear(dl, dl))
    randomise(projector)
    n_layers = tower.config.num_hidden_layers
    state = {}
    for k, v in tower.state_dict().items():
        # Real PIVOT checkpoints keep HF 4.x's `vision_model.` level (transformers 5 drops it).
        k = k if k.startswith("vision_model.") else f"vision_model.{k}"
        if k.startswith(f"vision_model.encoder.layers.{n_layers - 1}.") or k.startswith("vision_model.head."):
            continue  # PIVOT deletes the last layer and the MAP head
        state[f"model.vision_tower.vision_tower.{k}"] = v
    for k, v in projector.state_dict().items():
        state[f"model.mm_projector.{k}"] = v
    for k, v in lm.state_dict().items():
        if k == "lm_head.weight" and lm.config.tie_word_embeddings:
            continue
        state[k] = v
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    cfg = lm.config.to_dict()
    cfg.update({"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen",
                "mm_vision_tower": os.path.abspath(tower_dir), "mm_hidden_size": dv,
                "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch", "tokenizer_model_max_length": 2048})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(lm_dir, "tokenizer.json")) as src, open(os.path.join(d, "tokenizer.json"), "w") as dst:
        dst.write(src.read())

    size = tower.config.image_size
    pixels = torch.randn(2, 3, size, size)
    seqs = [[5, 6, 7, -200, 8, 9], [10, -200, 11, 12]]
    with torch.no_grad():
        feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        img = projector(feats)
        emb = lm.get_input_embeddings()
        rows = []
        for b, s in enumerate(seqs):
            k = s.index(-200)
            rows.append(torch.cat([emb(torch.tensor(s[:k])), img[b], emb(torch.tensor(s[k + 1:]))]))
        t = max(r.shape[0] for r in rows)
        embeds = torch.zeros(2, t, dl)
        mask = torch.zeros(2, t, dtype=torch.long)
        for b, r in enumerate(rows):
            embeds[b, : r.shape[0]] = r
            mask[b, : r.shape[0]] = 1
        logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
    flat = torch.full((2, max(len(s) for s in seqs)), -1, dtype=torch.long)
    for b, s in enumerate(seqs):
        flat[b, : len(s)] = torch.tensor(s)
    save_reference(d, {"pixel_values": pixels, "seq_ids": flat, "image_tokens": img, "attention_mask": mask, "logits": logits})


def tokenizer_fixture(out, fast):
    """Token ids of a few texts under the HF tokenizer (our `tokenizers` wrapper must agree)."""
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
             "How many shapes are there?", "The red square is left of the blue circle."]
    ids = [fast(t, add_special_tokens=False)["input_ids"] for t in texts]
    with open(os.path.join(out, "tokenizer_cases.json"), "w") as f:
        json.dump({"texts": texts, "ids": ids}, f)


def adamw_fixture(out):
    """torch.optim.AdamW (single-tensor) over six steps with two learning-rate groups, weight decay,
    a schedule and norm clipping that bites on some steps only. Weights and gradients are
    bf16-representable, so our fp32 path and our bf16 path (fp32 master copy) must both match it."""
    d = os.path.join(out, "adamw")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    bf = lambda t: t.to(torch.bfloat16).float()
    shapes = {"tower.a": (7, 5), "tower.b": (11,), "lm.c": (3, 4, 2)}
    init = {k: bf(torch.randn(s, generator=g)) for k, s in shapes.items()}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    cfg = {"steps": 6, "lr_tower": 2e-2, "lr_lm": 5e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.1,
           "max_norm": 1.5, "lr_scale": [0.25, 0.5, 1.0, 1.0, 0.6, 0.2]}
    grads = {f"grad.{s}.{k}": bf(torch.randn(shapes[k], generator=g) * (0.05 + 0.1 * s))
             for s in range(cfg["steps"]) for k in shapes}
    opt = torch.optim.AdamW([{"params": [params["tower.a"], params["tower.b"]], "lr": cfg["lr_tower"]},
                             {"params": [params["lm.c"]], "lr": cfg["lr_lm"]}],
                            betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"], foreach=False)
    norms = []
    for s in range(cfg["steps"]):
        for k, p in params.items():
            p.grad = grads[f"grad.{s}.{k}"].clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=cfg["max_norm"])))
        for group, base in zip(opt.param_groups, [cfg["lr_tower"], cfg["lr_lm"]]):
            group["lr"] = base * cfg["lr_scale"][s]
        opt.step()
    cfg["grad_norms"] = norms
    tensors = {f"init.{k}": v for k, v in init.items()} | grads
    for k, p in params.items():
        st = opt.state[p]
        tensors |= {f"param.{k}": p.detach(), f"m.{k}": st["exp_avg"], f"v.{k}": st["exp_avg_sq"]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    clip_cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4,
                                image_size=30, patch_size=6, projection_dim=16, hidden_act="quick_gelu",
                                layer_norm_eps=1e-5)
    vision_fixture(out, "clip", randomise(CLIPVisionModel(clip_cfg)), 30)

    siglip_cfg = SiglipVisionConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                                    image_size=28, patch_size=7, vision_use_head=True, layer_norm_eps=1e-6)
    siglip = vision_fixture(out, "siglip", randomise(SiglipVisionModel(siglip_cfg)), 28)
    siglip_bf16_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=50, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=4, vision_use_head=False)
    vision_fixture(out, "siglip_bf16", randomise(SiglipVisionModel(siglip_bf16_cfg)), 16, dtype=torch.bfloat16)

    tok_dir = os.path.join(out, "tokenizer")
    fast = train_tokenizer(tok_dir)
    tokenizer_fixture(tok_dir, fast)
    vocab = fast.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    untied = Qwen2Config(vocab_size=vocab + 7, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)
    lm = qwen_fixture(out, "qwen2_untied", untied, fast, shard=True)
    tied = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, use_sliding_window=False)
    qwen_fixture(out, "qwen2_tied", tied, fast)
    mllm_fixture(out, os.path.join(out, "siglip"), siglip, os.path.join(out, "qwen2_untied"), lm)
    adamw_fixture(out)
    print(f"parity fixtures written to {out}")


if __name__ == "__main__":
    main()
