"""Converts a MoCo v3 ViT release (a pickled `.pth.tar`) into a timm hub folder of safetensors.

The MoCo v3 checkpoints (e.g. https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar)
are pickles. The prelude never unpickles anything; this one step turns the file into what it
loads, once, on the researcher's side:

    .venv/bin/python tools/convert_moco_v3.py vit-b-300ep.pth.tar moco-vit-b-16/

It reads the file with `torch.load(weights_only=True)` (tensors and plain containers only, no code
runs), keeps the tower, the keys under `module.base_encoder.` (timm's VisionTransformer layout),
drops MoCo's projection MLP (`head.*`, not part of the encoder PIVOT feeds to the MLLM), the
momentum encoder and the predictor, and writes:

  model.safetensors  the tower's weights under timm's own names
  config.json        timm's hub config: architecture, model_args (read off the weights' shapes,
                     plus --num-heads, which the weights do not record) and pretrained_cfg with
                     MoCo v3's evaluation preprocessing (resize 256 bilinear, centre crop 224,
                     ImageNet mean/std: crop_pct = 224/256)

The folder then loads with `VisionTower::from_pretrained` and with
`timm.create_model("local-dir:moco-vit-b-16", pretrained=True)`.

Needs torch and safetensors (both in tests/requirements.txt's environment).
"""

import argparse
import json
import os
import re
import sys

import torch
from safetensors.torch import save_file

PREFIX = "module.base_encoder."


def convert(src, out_dir, num_heads, architecture):
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        sys.exit(f"{src}: expected a dict with a `state_dict` of tensors, found {type(ckpt).__name__}")
    tower = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    tower = {k: v for k, v in tower.items() if not k.startswith("head.")}
    if "cls_token" not in tower or "patch_embed.proj.weight" not in tower:
        found = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state if k.count(".") > 1})[:8]
        sys.exit(f"{src}: no `{PREFIX}cls_token` / `{PREFIX}patch_embed.proj.weight`: not a MoCo v3 ViT "
                 f"checkpoint (key prefixes found: {found})")
    embed_dim = tower["cls_token"].shape[-1]
    patch = tower["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in tower if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = int(round((tower["pos_embed"].shape[1] - 1) ** 0.5))
    mlp_hidden = tower["blocks.0.mlp.fc1.weight"].shape[0]
    if embed_dim % num_heads:
        sys.exit(f"--num-heads {num_heads} does not divide the embedding width {embed_dim}")
    model_args = {"img_size": grid * patch, "patch_size": patch, "embed_dim": embed_dim, "depth": depth,
                  "num_heads": num_heads, "mlp_ratio": mlp_hidden / embed_dim, "qkv_bias": "blocks.0.attn.qkv.bias" in tower}
    size = grid * patch
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "mocov3",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "crop_pct": 224 / 256,
            "crop_mode": "center",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {len(tower)} tensors ({depth} blocks, width {embed_dim}, patch {patch}, {size}px) to {out_dir}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="MoCo v3 .pth.tar (e.g. vit-b-300ep.pth.tar)")
    p.add_argument("out_dir", help="folder to write model.safetensors and config.json to")
    p.add_argument("--num-heads", type=int, default=12, help="attention heads (MoCo v3 ViT-S and ViT-B: 12)")
    p.add_argument("--architecture", default="vit_base_patch16_224", help="timm architecture name for config.json")
    a = p.parse_args()
    convert(a.checkpoint, a.out_dir, a.num_heads, a.architecture)


if __name__ == "__main__":
    main()
