"""Loads a directory written by our `save_pretrained` with `transformers` (or timm) and checks it.

  python check_roundtrip.py vision|qwen2 DIR [DIR ...]

Passes (prints ROUNDTRIP OK, exit 0) only if the library loads the model with no missing,
unexpected or mismatched keys and no warning, and reproduces the outputs we stored in
DIR/ours.safetensors to 1e-4 relative error (one line per DIR; several DIRs share one start-up of
torch, transformers and timm). A vision folder whose config.json has timm's
`architecture` is loaded with `timm.create_model("local-dir:DIR", pretrained=True)` (strict: any
missing or unexpected key raises); the others with their transformers class (CLIP, SigLIP,
DINOv2 with and without registers, ViT, ViT-MAE). Inputs of another size than the model's run
with interpolated position embeddings; ViT-MAE runs unmasked (mask_ratio 0, patches in order).
"""

import json
import logging
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    CLIPVisionModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    Qwen2ForCausalLM,
    SiglipVisionModel,
    ViTMAEModel,
    ViTModel,
)
from transformers.utils import logging as hf_logging

VISION = {
    "clip_vision_model": CLIPVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
    "vit": ViTModel,
    "vit_mae": ViTMAEModel,
}


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def timm_outputs(d, pixels):
    import timm

    model = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
        states = [x]
        for blk in model.blocks:
            x = blk(x)
            states.append(x)
        last = model.forward_features(pixels)
        pooled = model.forward_head(last, pre_logits=True)
    pairs = [("last_hidden_state", last), ("pooler_output", pooled)]
    return type(model).__name__, pairs + [(f"hidden_states.{i}", h) for i, h in enumerate(states)]


def hf_vision_outputs(d, cfg, pixels):
    cls = VISION[cfg.model_type]
    model, info = cls.from_pretrained(d, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"loading info not clean: {problems}")
    kwargs = {}
    size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    if cfg.model_type in ("vit", "vit_mae") and tuple(pixels.shape[2:]) != (size, size):
        kwargs["interpolate_pos_encoding"] = True
    if cfg.model_type == "vit_mae":
        model.config.mask_ratio = 0.0
        n = (pixels.shape[2] // cfg.patch_size) * (pixels.shape[3] // cfg.patch_size)
        kwargs["noise"] = torch.arange(n, dtype=torch.float32).repeat(pixels.shape[0], 1)
    with torch.no_grad():
        o = model(pixel_values=pixels, output_hidden_states=True, **kwargs)
    pairs = [("last_hidden_state", o.last_hidden_state)]
    pairs += [(f"hidden_states.{i}", h) for i, h in enumerate(o.hidden_states)]
    if getattr(o, "pooler_output", None) is not None:
        pairs.append(("pooler_output", o.pooler_output))
    return cls.__name__, pairs


def main():
    kind = sys.argv[1]
    hf_logging.set_verbosity_warning()
    for d in sys.argv[2:]:
        check(kind, d)


def check(kind, d):
    collect = Collect()
    hf_logging.get_logger().addHandler(collect)
    ours = load_file(f"{d}/ours.safetensors")
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    if kind == "vision" and "architecture" in raw:
        name, pairs = timm_outputs(d, ours["pixel_values"])
    elif kind == "vision":
        name, pairs = hf_vision_outputs(d, AutoConfig.from_pretrained(d), ours["pixel_values"])
    else:
        model, info = Qwen2ForCausalLM.from_pretrained(d, output_loading_info=True)
        model.eval()
        problems = {k: v for k, v in info.items() if v}
        if problems:
            sys.exit(f"loading info not clean: {problems}")
        with torch.no_grad():
            o = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"])
        name, pairs = "Qwen2ForCausalLM", [("logits", o.logits)]
    hf_logging.get_logger().removeHandler(collect)
    warnings = [m for m in collect.records if "key" in m.lower() or "initialized" in m.lower() or "missing" in m.lower()]
    if warnings:
        sys.exit(f"transformers warned while loading: {warnings}")
    missing = [n for n, _ in pairs if n not in ours and n != "pooler_output"]
    if missing:
        sys.exit(f"ours.safetensors lacks {missing}")
    worst = 0.0
    compared = 0
    for n, theirs in pairs:
        if n not in ours:
            continue
        e = rel(ours[n], theirs)
        worst = max(worst, e)
        compared += 1
        if e > 1e-4:
            sys.exit(f"{d}: {n}: relative error {e:.3e} > 1e-4")
    print(f"ROUNDTRIP OK {name} ({compared} tensors, worst relative error {worst:.2e})")


if __name__ == "__main__":
    main()
