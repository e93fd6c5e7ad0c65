"""Reference DPO / SFT training step in the stack researchers run today: HF transformers
SiglipVisionModel + MLP projector + Qwen2ForCausalLM assembled as LLaVA / PIVOT do, with a
TRL-style sigmoid DPO step and an HF causal-LM SFT step.

Reads the shapes and the exact token ids / preprocessed pixels that `bench_train export` wrote, so
both sides see the same model shapes and the same sequences. Prints one JSON object.

    python benches/ref_train.py dpo --data out/bench/cpu --steps 5 --warmup 1 --threads 2 --device cpu
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200


def vm_hwm_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class LlavaQwen(nn.Module):
    """Vision tower (last layer and post-LN/head dropped, LLaVA `SigLipVisionTower`) → mlp2x_gelu
    projector → Qwen2ForCausalLM, with LLaVA's `prepare_inputs_labels_for_multimodal` splicing."""

    def __init__(self, vcfg, lcfg, dtype):
        super().__init__()
        tower = SiglipVisionModel._from_config(vcfg, attn_implementation="sdpa", dtype=dtype)
        vm = getattr(tower, "vision_model", tower)  # transformers 5 flattens SiglipVisionModel
        self.vm = vm
        vm.encoder.layers = vm.encoder.layers[:-1]
        vm.post_layernorm = nn.Identity()
        if hasattr(vm, "head"):
            vm.head = nn.Identity()
        self.vision_tower = tower
        d_v, d_l = vcfg.hidden_size, lcfg.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(d_v, d_l), nn.GELU(), nn.Linear(d_l, d_l)).to(dtype)
        self.lm = Qwen2ForCausalLM._from_config(lcfg, attn_implementation="sdpa", dtype=dtype)

    def encode_images(self, pixels):
        out = self.vision_tower(pixel_values=pixels.to(self.mm_projector[0].weight.dtype), output_hidden_states=True)
        return self.mm_projector(out.hidden_states[-1])

    def prepare(self, input_ids, labels, attention_mask, image_features, max_len=2048):
        embed = self.lm.get_input_embeddings()
        new_embeds, new_labels = [], []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()  # LLaVA strips the collator's padding first
            ids, lab = input_ids[b][keep], labels[b][keep]
            k = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
            text = embed(torch.cat([ids[:k], ids[k + 1 :]]))
            emb = torch.cat([text[:k], image_features[b], text[k:]])
            n = image_features.shape[1]
            lab = torch.cat([lab[:k], torch.full((n,), IGNORE_INDEX, device=lab.device, dtype=lab.dtype), lab[k + 1 :]])
            new_embeds.append(emb[:max_len])
            new_labels.append(lab[:max_len])
        t = max(e.shape[0] for e in new_embeds)
        bsz, d = len(new_embeds), new_embeds[0].shape[1]
        embeds = torch.zeros((bsz, t, d), dtype=new_embeds[0].dtype, device=new_embeds[0].device)
        labels_p = torch.full((bsz, t), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
        mask = torch.zeros((bsz, t), dtype=torch.long, device=input_ids.device)
        pos = torch.zeros((bsz, t), dtype=torch.long, device=input_ids.device)
        for i, (e, l) in enumerate(zip(new_embeds, new_labels)):  # right padding (padding_side "right")
            n = e.shape[0]
            embeds[i, :n] = e
            labels_p[i, :n] = l
            mask[i, :n] = 1
            pos[i, :n] = torch.arange(n, device=input_ids.device)
        return embeds, mask, labels_p, pos

    def forward(self, input_ids, labels, attention_mask, pixels, with_loss=False):
        feats = self.encode_images(pixels)
        embeds, mask, labels, pos = self.prepare(input_ids, labels, attention_mask, feats)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels if with_loss else None)
        return out, labels, mask


def get_batch_logps(logits, labels):
    """TRL `get_batch_logps` (sum over completion tokens)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != IGNORE_INDEX
    labels[labels == IGNORE_INDEX] = 0
    per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return (per_token * loss_mask).sum(-1)


def pad_cat(a, b, pad):
    t = max(a.shape[1], b.shape[1])
    f = lambda x: F.pad(x, (0, t - x.shape[1]), value=pad)
    return torch.cat([f(a), f(b)])


def cosine_lambda(total, warmup_ratio=0.03):
    warmup = math.ceil(total * warmup_ratio)

    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        p = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))

    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["dpo", "sft"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
        try:
            torch.set_num_interop_threads(a.threads)
        except RuntimeError:
            pass
    dev = torch.device(a.device)
    shapes = json.load(open(os.path.join(a.data, "shapes.json")))
    dtype = torch.float32 if shapes["dtype"] == "float32" else torch.bfloat16
    batch = {k: v.to(dev) for k, v in load_file(os.path.join(a.data, "batch.safetensors")).items()}

    t_build = time.perf_counter()
    torch.manual_seed(0)
    vh = {k: v for k, v in shapes["vision_hf"].items() if k not in ("architectures", "model_type")}
    lh = {k: v for k, v in shapes["lm_hf"].items() if k not in ("architectures", "model_type")}
    vcfg = SiglipVisionConfig(**vh)
    lcfg = Qwen2Config(**lh)
    # Parameters of the untruncated tower (what our VisionTower stores) for the shape check.
    model = LlavaQwen(vcfg, lcfg, dtype).to(dev)
    n_layers_dropped = vcfg.num_hidden_layers - len(model.vm.encoder.layers)
    per_layer = sum(p.numel() for p in model.vm.encoder.layers[0].parameters())
    params = sum(p.numel() for p in model.parameters()) + n_layers_dropped * per_layer + 2 * vcfg.hidden_size  # + post-LN
    if vcfg.vision_use_head:  # the MAP head LLaVA drops
        probe = SiglipVisionModel._from_config(SiglipVisionConfig(**{**vh, "num_hidden_layers": 1}))
        params += sum(p.numel() for p in getattr(probe, "vision_model", probe).head.parameters())
    ref = None
    if a.task == "dpo":  # TRL without ZeRO-3: a deep copy of the policy, eval mode, no grad
        import copy

        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    model.train()
    total = a.steps + a.warmup
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))
    build_s = time.perf_counter() - t_build
    bsz = shapes["dpo_pairs"] if a.task == "dpo" else shapes["sft_batch"]
    pad = shapes["pad_id"]
    n = batch["pixels"].shape[0]
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times, cpu, tokens, losses = [], [], 0, []
    # PIVOT_PROFILE_STEPS=1: the same phase split as ours (each mark waits for the device).
    profile = os.environ.get("PIVOT_PROFILE_STEPS", "") not in ("", "0")
    phases, last = {}, [0.0]

    def mark(name):
        if profile:
            sync()
            now = time.perf_counter()
            phases.setdefault(name, []).append(now - last[0])
            last[0] = now
    for step in range(total):
        idx = torch.arange(step * bsz, (step + 1) * bsz) % n
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        last[0] = t0
        pixels = batch["pixels"][idx]
        if a.task == "dpo":
            # concatenated_forward: [chosen; rejected], images + images (each image encoded twice)
            ids = pad_cat(batch["chosen_ids"][idx], batch["rejected_ids"][idx], pad)
            labels = pad_cat(batch["chosen_labels"][idx], batch["rejected_labels"][idx], IGNORE_INDEX)
            attn = pad_cat(torch.ones_like(batch["chosen_ids"][idx]), torch.ones_like(batch["rejected_ids"][idx]), 0)
            imgs = torch.cat([pixels, pixels])
            mark("data")
            out, lab, mask = model(ids, labels, attn, imgs)
            logps = get_batch_logps(out.logits.to(torch.float32), lab)
            mark("policy forward")
            with torch.no_grad():
                rout, rlab, _ = ref(ids, labels, attn, imgs)
                rlogps = get_batch_logps(rout.logits.to(torch.float32), rlab)
            mark("reference")
            pc, pr = logps[:bsz], logps[bsz:]
            rc, rr = rlogps[:bsz], rlogps[bsz:]
            h = (pc - pr) - (rc - rr)
            loss = -F.logsigmoid(0.1 * h).mean()
            mark("loss + metrics")
        else:
            ids, labels = batch["chosen_ids"][idx], batch["chosen_labels"][idx]
            mark("data")
            out, lab, mask = model(ids, labels, torch.ones_like(ids), pixels, with_loss=True)
            loss = out.loss
            mark("forward + loss")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mark("grad norm")
        opt.step()
        sched.step()
        mark("optimizer")
        opt.zero_grad(set_to_none=True)
        mark("zero grad")
        losses.append(loss.item())
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tokens = int(mask.sum())
    measured = times[a.warmup :]
    med = statistics.median(measured)
    res = {
        "side": "reference",
        "task": a.task,
        "variant": "trl" if a.task == "dpo" else "hf",
        "size": shapes["size"],
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "batch": bsz,
        "sequences": 2 * bsz if a.task == "dpo" else bsz,
        "images_encoded": 2 * bsz if a.task == "dpo" else bsz,
        "tokens_per_step": tokens,
        "step_s": med,
        "phases_s": {k: statistics.median(v[a.warmup :]) for k, v in phases.items() if v[a.warmup :]},
        "step_times_s": measured,
        "step_cpu_s": statistics.median(cpu[a.warmup :]),
        "step_cpu_times_s": cpu[a.warmup :],
        "tokens_per_s": tokens / med,
        "samples_per_s": bsz / med,
        "build_s": build_s,
        "peak_rss_mib": vm_hwm_mib(),
        "params": params,
        "loss_first": losses[0],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    if dev.type == "cuda":
        res["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    text = json.dumps(res)
    if a.json:
        open(a.json, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
