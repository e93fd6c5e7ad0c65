"""Small random DINOv2, ViT, ViT-MAE and timm ViT towers with reference outputs.

The encoder families PIVOT trains besides CLIP/SigLIP. prelude/tests/model_encoders.rs loads each
folder with our loaders and compares every hidden state, the last hidden state and the pooled
output at 1e-4. Every parameter is random (norm scales around 1, layer scales included), shapes are
odd (head dims 12, 6 and 10, 4x4 and 5x5 patch grids), and each tower is also run at a size other
than its native one so that position-embedding interpolation is compared, not only the native path.

Folders (under OUT_DIR):
  dinov2         Dinov2Model, GELU MLP; inputs at 28x28 (native) and 21x35 (bicubic interpolation)
  dinov2_swiglu  Dinov2Model with the giant variant's SwiGLU MLP
  dinov2_reg     Dinov2WithRegistersModel, 3 registers; native 35x35 and a 21x21 input
                 (bicubic with antialias, downsampled)
  vit            ViTModel with its pooler; native 30x30 and 24x36 (interpolate_pos_encoding=True)
  vit_mae        ViTMAEModel saved with mask_ratio 0.75 as released; the reference runs it as MAE is
                 used at inference (mask_ratio 0, noise = arange: no masking, every patch in order)
  timm_vit       timm VisionTransformer (timm's own config.json: architecture, model_args,
                 pretrained_cfg), with a 7-class head
  moco_v3        a MoCo v3 style .pth.tar (`module.base_encoder.` + timm keys, a projection MLP and
                 a momentum encoder) converted by tools/convert_moco_v3.py; reference from timm

Usage: python make_encoder_fixtures.py OUT_DIR
"""

import json
import os
import subprocess
import sys

import timm
import torch
from safetensors.torch import save_file
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTImageProcessor,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.manual_seed(4321)


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and (name.endswith("weight") or "lambda1" in name or name.endswith("gamma")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # norm and layer scales
            else:
                p.copy_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(0.2 * torch.randn_like(b))
    return model.eval()


def save_reference(d, tensors):
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, os.path.join(d, "reference.safetensors"))


def record(ref, tag, out, pixels):
    ref[f"{tag}pixel_values"] = pixels
    ref[f"{tag}last_hidden_state"] = out.last_hidden_state
    if getattr(out, "pooler_output", None) is not None:
        ref[f"{tag}pooler_output"] = out.pooler_output
    for i, h in enumerate(out.hidden_states):
        ref[f"{tag}hidden_states.{i}"] = h


def pivot_interp(tokens, n):
    """PIVOT's DINOv2 `interpolate`: patch tokens on their square grid, bilinearly to sqrt(n)^2."""
    b, t, d = tokens.shape
    side, target = int(t ** 0.5), int(n ** 0.5)
    x = tokens.view(b, side, side, d).permute(0, 3, 1, 2).contiguous()
    x = torch.nn.functional.interpolate(x.float(), size=(target, target), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous().flatten(1, 2)


def hf_fixture(out, name, model, sizes, processor=None, forward_kwargs=lambda h, w: {}, extra=None):
    """Saves `model` with save_pretrained and its outputs at each (height, width) in `sizes`:
    the first under plain keys, the others under `interp{i}.`; `extra(ref)` adds derived tensors."""
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(d)
    ref = {}
    for i, (h, w) in enumerate(sizes):
        pixels = torch.randn(2, 3, h, w)
        with torch.no_grad():
            o = model(pixel_values=pixels, output_hidden_states=True, **forward_kwargs(h, w))
        record(ref, "" if i == 0 else f"interp{i}.", o, pixels)
    if extra is not None:
        extra(ref)
    save_reference(d, ref)


def timm_features(model, pixels):
    """HF-style outputs of a timm ViT: the embeddings, every block's output, the normed tokens
    (forward_features) and the pre-logits pooled vector."""
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
        states = [x]
        for blk in model.blocks:
            x = blk(x)
            states.append(x)
        last = model.norm(x)
        assert torch.equal(last, model.forward_features(pixels))
        pooled = model.forward_head(last, pre_logits=True)
    return states, last, pooled


def timm_reference(d, model, size):
    pixels = torch.randn(2, 3, size, size)
    states, last, pooled = timm_features(model, pixels)
    ref = {"pixel_values": pixels, "last_hidden_state": last, "pooler_output": pooled}
    ref |= {f"hidden_states.{i}": h for i, h in enumerate(states)}
    save_reference(d, ref)


def timm_fixture(out):
    d = os.path.join(out, "timm_vit")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=30, patch_size=6, embed_dim=40,
                              depth=3, num_heads=4, mlp_ratio=1.7, num_classes=7)
    randomise(model)
    timm.models.save_for_hf(model, d, safe_serialization=True,
                            model_config={"pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                                             "crop_pct": 0.9, "interpolation": "bicubic"}})
    timm_reference(d, model, 30)


def moco_fixture(out):
    """A checkpoint shaped like MoCo v3's vit-b-300ep.pth.tar, at a tiny size."""
    d = os.path.join(out, "moco_v3")
    os.makedirs(d, exist_ok=True)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=24, patch_size=8, embed_dim=24,
                              depth=2, num_heads=2, num_classes=0)
    randomise(model)
    state = {f"module.base_encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    # MoCo's projection MLP replaces the classifier; the momentum encoder and predictor come along.
    for k, shape in {"head.0.weight": (32, 24), "head.1.weight": (32,), "head.3.weight": (16, 32)}.items():
        state[f"module.base_encoder.{k}"] = torch.randn(shape)
        state[f"module.momentum_encoder.{k}"] = torch.randn(shape)
    state["module.momentum_encoder.cls_token"] = torch.randn(1, 1, 24)
    state["module.predictor.0.weight"] = torch.randn(16, 16)
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}},
               os.path.join(d, "vit-tiny-moco.pth.tar"))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_moco_v3.py"),
                    os.path.join(d, "vit-tiny-moco.pth.tar"), os.path.join(d, "converted"), "--num-heads", "2"],
                   check=True)
    os.remove(os.path.join(d, "vit-tiny-moco.pth.tar"))
    timm_reference(os.path.join(d, "converted"), model, 24)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    dino_processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                       do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225], resample=3)
    dinov2 = Dinov2Config(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=3, image_size=28,
                          patch_size=7, layer_norm_eps=1e-6, layerscale_value=0.5)
    # PIVOT's DINOv2 features with `-interp9`: last_hidden_state[:, 1:] (4x4) resampled to 3x3.
    interp9 = lambda ref: ref.update(pivot_patch_interp9=pivot_interp(ref["last_hidden_state"][:, 1:], 9))
    hf_fixture(out, "dinov2", randomise(Dinov2Model(dinov2)), [(28, 28), (21, 35)], dino_processor, extra=interp9)
    swiglu = Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=28,
                          patch_size=7, use_swiglu_ffn=True)
    hf_fixture(out, "dinov2_swiglu", randomise(Dinov2Model(swiglu)), [(28, 28), (35, 35)])
    reg = Dinov2WithRegistersConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2,
                                    image_size=35, patch_size=7, num_register_tokens=3)
    hf_fixture(out, "dinov2_reg", randomise(Dinov2WithRegistersModel(reg)), [(35, 35), (21, 21), (28, 42)])

    vit = ViTConfig(hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=50, image_size=30,
                    patch_size=6, layer_norm_eps=1e-12)
    vit_processor = ViTImageProcessor(size={"height": 30, "width": 30}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    hf_fixture(out, "vit", randomise(ViTModel(vit)), [(30, 30), (24, 36)], vit_processor,
               forward_kwargs=lambda h, w: {"interpolate_pos_encoding": (h, w) != (30, 30)})

    mae_cfg = ViTMAEConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=56,
                           image_size=28, patch_size=7, mask_ratio=0.75)
    mae = randomise(ViTMAEModel(mae_cfg))
    mae.save_pretrained(os.path.join(out, "vit_mae"), safe_serialization=True)
    # As MAE is used at inference: nothing masked, patches in their order (argsort of arange).
    mae.config.mask_ratio = 0.0
    ref = {}
    for i, (h, w) in enumerate([(28, 28), (35, 21)]):
        pixels = torch.randn(2, 3, h, w)
        n = (h // 7) * (w // 7)
        with torch.no_grad():
            o = mae(pixel_values=pixels, noise=torch.arange(n, dtype=torch.float32).repeat(2, 1),
                    output_hidden_states=True, interpolate_pos_encoding=(h, w) != (28, 28))
        assert torch.equal(o.ids_restore[0], torch.arange(n))
        record(ref, "" if i == 0 else f"interp{i}.", o, pixels)
    save_reference(os.path.join(out, "vit_mae"), ref)

    timm_fixture(out)
    moco_fixture(out)
    print(f"encoder fixtures written to {out}")


if __name__ == "__main__":
    main()
