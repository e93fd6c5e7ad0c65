"""Loads a directory written by our `save_pretrained` with `transformers` and checks it.

  python check_roundtrip.py vision|qwen2 DIR

Passes (prints ROUNDTRIP OK, exit 0) only if transformers loads the model with no missing,
unexpected or mismatched keys and no warning, and reproduces the outputs we stored in
DIR/ours.safetensors to 1e-4 relative error.
"""

import logging
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, CLIPVisionModel, Qwen2ForCausalLM, SiglipVisionModel
from transformers.utils import logging as hf_logging


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def main():
    kind, d = sys.argv[1], sys.argv[2]
    hf_logging.set_verbosity_warning()
    collect = Collect()
    hf_logging.get_logger().addHandler(collect)
    cfg = AutoConfig.from_pretrained(d)
    if kind == "vision":
        cls = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}[cfg.model_type]
    else:
        cls = Qwen2ForCausalLM
    model, info = cls.from_pretrained(d, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"loading info not clean: {problems}")
    warnings = [m for m in collect.records if "key" in m.lower() or "initialized" in m.lower() or "missing" in m.lower()]
    if warnings:
        sys.exit(f"transformers warned while loading: {warnings}")
    ours = load_file(f"{d}/ours.safetensors")
    worst = 0.0
    with torch.no_grad():
        if kind == "vision":
            o = model(pixel_values=ours["pixel_values"], output_hidden_states=True)
            pairs = [("last_hidden_state", o.last_hidden_state)]
            pairs += [(f"hidden_states.{i}", h) for i, h in enumerate(o.hidden_states)]
            if "pooler_output" in ours:
                pairs.append(("pooler_output", o.pooler_output))
        else:
            o = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"])
            pairs = [("logits", o.logits)]
    for name, theirs in pairs:
        e = rel(ours[name], theirs)
        worst = max(worst, e)
        if e > 1e-4:
            sys.exit(f"{name}: relative error {e:.3e} > 1e-4")
    print(f"ROUNDTRIP OK {cls.__name__} ({len(pairs)} tensors, worst relative error {worst:.2e})")


if __name__ == "__main__":
    main()
