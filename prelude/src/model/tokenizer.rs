//! Tokenizer: HF `tokenizer.json` through the `tokenizers` crate, plus the ChatML (`qwen_1_5`)
//! template the PIVOT models are trained with. The tiny preset is a word-level tokenizer over a
//! built-in vocabulary (every word the embedded world writes), serialised in the same
//! `tokenizer.json` format so that the same code path serves both.

use crate::data::vocab::TINY_VOCABULARY;
use crate::error::{PivotError, Result};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from (`tiny` or the tokenizer.json path).
    pub source: String,
    pub im_start: i64,
    pub im_end: i64,
    /// Padding id (Qwen: `<|endoftext|>`).
    pub pad: i64,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer `{}` ({} tokens)", self.source, self.vocab_size())
    }
}

fn special_id(inner: &tokenizers::Tokenizer, token: &str, source: &str) -> Result<i64> {
    inner
        .token_to_id(token)
        .map(|i| i as i64)
        .ok_or_else(|| PivotError::config(source, "added_tokens", format!("the ChatML token `{token}` is not in the vocabulary")))
}

impl Tokenizer {
    fn wrap(inner: tokenizers::Tokenizer, source: String) -> Result<Self> {
        Ok(Tokenizer {
            im_start: special_id(&inner, IM_START, &source)?,
            im_end: special_id(&inner, IM_END, &source)?,
            pad: special_id(&inner, END_OF_TEXT, &source)?,
            inner,
            source,
        })
    }

    /// Loads a HF `tokenizer.json` (a file, or a model directory containing one).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file: PathBuf = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| PivotError::file(&file, e))?;
        let inner = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| PivotError::file(&file, format!("not a valid tokenizer.json: {e}")))?;
        Self::wrap(inner, file.display().to_string())
    }

    /// The word-level tokenizer of the tiny preset.
    pub fn tiny() -> Self {
        Self::word_level(TINY_VOCABULARY).expect("the built-in vocabulary forms a valid tokenizer")
    }

    /// A word-level tokenizer over `words` (whitespace split, each punctuation mark its own
    /// word), with the ChatML special tokens first.
    pub fn word_level(words: &[&str]) -> Result<Self> {
        let specials = [END_OF_TEXT, IM_START, IM_END, "<unk>"];
        let mut vocab = serde_json::Map::new();
        for w in specials.iter().chain(words.iter()) {
            let id = vocab.len();
            vocab.entry(w.to_string()).or_insert(id.into());
        }
        let added: Vec<serde_json::Value> = specials[..3]
            .iter()
            .enumerate()
            .map(|(id, t)| {
                serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                                   "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "WhitespaceSplit"}, {"type": "Punctuation", "behavior": "Isolated"}]},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        let inner = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| PivotError::invalid(format!("word-level tokenizer: {e}")))?;
        Self::wrap(inner, "tiny".into())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }

    /// Token ids of `text` (special tokens written in the text are recognised; none are added).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, false).map_err(|e| PivotError::invalid(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`, skipping special tokens and negative sentinels (image, ignore).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter(|&&i| i >= 0).map(|&i| i as u32).collect();
        self.inner.decode(&ids, true).map_err(|e| PivotError::invalid(format!("decoding: {e}")))
    }

    /// Ids that are not known words (unknown-token hits); empty for real BPE tokenizers.
    pub fn unknown_ids(&self) -> Vec<i64> {
        self.token_to_id("<unk>").into_iter().collect()
    }

    /// Writes `tokenizer.json` (atomically).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = self.inner.to_string(true).map_err(|e| PivotError::file(path, e))?;
        super::weights::write_text_atomic(path, &text)
    }
}
