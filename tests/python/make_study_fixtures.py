"""Checkpoints shaped as published, at small sizes, and a data file in each real format, for running
the study notebooks on real-format inputs (tests/notebooks/test_real_inputs.py).

- siglip/: a full `SiglipModel` (vision and text towers, as google/siglip* is published) with its
  image processor; clip/: a full `CLIPModel` (openai/clip-vit-* layout). The notebooks take the
  vision tower out of them (`vision_model.` keys, `vision_config`).
- qwen2/: a `Qwen2ForCausalLM` with a byte-level BPE `tokenizer.json` holding the ChatML specials,
  `tokenizer_config.json` with Qwen2.5's chat template, `generation_config.json`.
- data/: PNG scenes (one coloured square on a grey ground) and
  captions.jsonl (image, caption), blip_pretrain.json (LLaVA pretraining: BLIP558K layout),
  llava_sft.json (LLaVA conversations), mmpr.jsonl (MMPR / RLAIF-V preference fields, with extra
  keys), pivot_dpo.json (PIVOT's DPO list, `prompt` = "<image>\\n…"), imagefolder/<class>/*.png (and
  imagefolder_val/, 2 other scenes per class),
  ADEChallengeData2016/ (ADE20K SceneParsing layout, reduce-zero-label masks) and cocostuff/
  (COCO-Stuff 164k layout); bad_line.jsonl: mmpr.jsonl with line 3 truncated.

siglip/ and clip/ also hold reference.safetensors: pixels and every hidden state of the model's
`vision_model` (prelude/tests/model_full_checkpoints.rs compares ours to them). Weights are drawn at
random (norm scales included), so a key taken from the wrong tower cannot pass.
Usage: python make_study_fixtures.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import random
import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

# Qwen2.5-Instruct's chat template (tokenizer_config.json), shortened to the no-tools branch.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SIZE = 32


def scene(colour: str, x: int, y: int) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    for i in range(x, min(x + 12, SIZE)):
        for j in range(y, min(y + 12, SIZE)):
            im.putpixel((i, j), COLOURS[colour])
    return im


def mask_of(x: int, y: int, value: int) -> Image.Image:
    m = Image.new("L", (SIZE, SIZE), 0)
    for i in range(x, min(x + 12, SIZE)):
        for j in range(y, min(y + 12, SIZE)):
            m.putpixel((i, j), value)
    return m


def tokenizer(out_dir: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"A {c} square on a grey ground. What colour is the square? The square is {c}." for c in COLOURS]
    corpus += ["You are a helpful assistant.", "Is the square left or right? It is on the left."]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") and p.dim() == 1 else 0.2 * torch.randn_like(p))
    return model.eval()


def vision_reference(model, out_dir: str) -> None:
    """Pixels and every hidden state of the full model's vision tower, as transformers computes them."""
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        o = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    ref = {"pixel_values": pixels, "last_hidden_state": o.last_hidden_state}
    ref.update({f"hidden_states.{i}": h for i, h in enumerate(o.hidden_states)})
    save_file({k: v.detach().clone().contiguous().float() for k, v in ref.items()}, os.path.join(out_dir, "reference.safetensors"))


def models_(out: str) -> None:
    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                           image_size=SIZE, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=300, max_position_embeddings=16)))
    randomise(siglip).save_pretrained(os.path.join(out, "siglip"), safe_serialization=True)
    vision_reference(siglip, os.path.join(out, "siglip"))
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(os.path.join(out, "siglip"))
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                           image_size=SIZE, patch_size=8, projection_dim=16),
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=300, max_position_embeddings=16, projection_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=1),
        projection_dim=16))
    randomise(clip).save_pretrained(os.path.join(out, "clip"), safe_serialization=True)
    vision_reference(clip, os.path.join(out, "clip"))

    qdir = os.path.join(out, "qwen2")
    fast = tokenizer(qdir)
    vocab = len(fast)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, use_sliding_window=False,
                                      bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
                                      eos_token_id=fast.convert_tokens_to_ids("<|im_end|>")))
    lm.save_pretrained(qdir, safe_serialization=True)


def data(out: str) -> None:
    d = os.path.join(out, "data")
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(24):
        colour = list(COLOURS)[i % len(COLOURS)]
        x, y = rng.randrange(0, SIZE - 12), rng.randrange(0, SIZE - 12)
        name = f"images/{i:03d}.png"
        scene(colour, x, y).save(os.path.join(d, name))
        side = "left" if x + 6 < SIZE / 2 else "right"
        wrong = [c for c in COLOURS if c != colour][i % 3]
        rows.append((name, colour, side, wrong, x, y))

    def jsonl(path, records):
        with open(os.path.join(d, path), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    jsonl("captions.jsonl", [{"image": n, "caption": f"A {c} square on a grey ground."} for n, c, *_ in rows])
    with open(os.path.join(d, "blip_pretrain.json"), "w") as f:
        json.dump([{"id": f"{k}", "image": n, "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": f"a {c} square on grey"}]} for k, (n, c, *_) in enumerate(rows)], f)
    with open(os.path.join(d, "llava_sft.json"), "w") as f:
        json.dump([{"id": f"{k}", "image": n, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": f"The square is {c}."},
            {"from": "human", "value": "Is the square left or right?"},
            {"from": "gpt", "value": f"It is on the {s}."}]} for k, (n, c, s, *_) in enumerate(rows)], f)
    mmpr = [{"image": n, "question": "<image>\nWhat colour is the square?", "chosen": f"The square is {c}.",
             "rejected": f"The square is {w}.", "id": k, "source": "fixture"} for k, (n, c, _, w, *_) in enumerate(rows)]
    jsonl("mmpr.jsonl", mmpr)
    with open(os.path.join(d, "pivot_dpo.json"), "w") as f:
        json.dump([{"id": r["id"], "image": r["image"], "prompt": "<image>\nWhat colour is the square?",
                    "chosen": r["chosen"], "rejected": r["rejected"]} for r in mmpr], f)
    lines = [json.dumps(r) + "\n" for r in mmpr]
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # line 3: truncated JSON
    with open(os.path.join(d, "bad_line.jsonl"), "w") as f:
        f.writelines(lines)

    for n, c, *_ in rows:  # ImageFolder: root/<class>/<image>
        os.makedirs(os.path.join(d, "imagefolder", c), exist_ok=True)
        Image.open(os.path.join(d, n)).save(os.path.join(d, "imagefolder", c, os.path.basename(n)))
    for i in range(8):  # a held-out ImageFolder with the same classes, 2 new scenes each (linear probes)
        colour = list(COLOURS)[i % len(COLOURS)]
        os.makedirs(os.path.join(d, "imagefolder_val", colour), exist_ok=True)
        scene(colour, rng.randrange(0, SIZE - 12), rng.randrange(0, SIZE - 12)).save(os.path.join(d, "imagefolder_val", colour, f"val{i:03d}.png"))

    # ADE20K: stored 0 = other, k = class k - 1 after reduce-zero-label; COCO-Stuff: COCO ids (1 = person ...).
    for root, img_dirs, ann_dirs, value in [
        ("ADEChallengeData2016", ("images/training", "images/validation"), ("annotations/training", "annotations/validation"), lambda k: 1 + k % 4),
        ("cocostuff", ("images/train2017", "images/val2017"), ("annotations/train2017", "annotations/val2017"), lambda k: [0, 1, 2, 3][k % 4]),
    ]:
        for split, (img_dir, ann_dir) in enumerate(zip(img_dirs, ann_dirs)):
            os.makedirs(os.path.join(d, root, img_dir), exist_ok=True)
            os.makedirs(os.path.join(d, root, ann_dir), exist_ok=True)
            for k, (n, c, _, _, x, y) in enumerate(rows[split::2]):
                stem = f"{root[:4].lower()}_{split}_{k:03d}"
                Image.open(os.path.join(d, n)).convert("RGB").save(os.path.join(d, root, img_dir, stem + ".jpg"), quality=95)
                mask_of(x, y, value(k)).save(os.path.join(d, root, ann_dir, stem + ".png"))


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    models_(out)
    data(out)
    print(f"study fixtures written to {out}")


if __name__ == "__main__":
    main()
