//! Loaders for the JSON formats of LLaVA, BLIP558K, RLAIF-V/MMPR and PIVOT.

use std::path::Path;

use super::json::{load_records, strip_image_placeholder, Layout, Record};
use super::{
    CaptionDataset, CaptionSample, ImageSource, LoadOptions, PreferenceDataset, PreferenceSample, VqaDataset,
    VqaSample,
};
use crate::error::Result;

/// (question, answer) pairs of a LLaVA `conversations` list, placeholder removed from questions.
fn conversation_pairs(record: &Record<'_>) -> Result<Vec<(String, String)>> {
    let turns = record.array("conversations")?;
    let mut pairs = Vec::new();
    let mut question: Option<String> = None;
    for (k, turn) in turns.iter().enumerate() {
        let field = |name: &str| format!("conversations[{k}].{name}");
        let Some(turn) = turn.as_object() else {
            return Err(record.error(&format!("conversations[{k}]"), "expected an object {\"from\", \"value\"}"));
        };
        let from = match turn.get("from") {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(_) => return Err(record.error(&field("from"), "expected a string")),
            None => return Err(record.error(&field("from"), "missing")),
        };
        let value = match turn.get("value") {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(_) => return Err(record.error(&field("value"), "expected a string")),
            None => return Err(record.error(&field("value"), "missing")),
        };
        match from {
            "human" | "user" => {
                if question.is_some() {
                    return Err(record.error(&field("from"), "two human turns in a row"));
                }
                question = Some(strip_image_placeholder(value));
            }
            "gpt" | "assistant" => {
                let Some(q) = question.take() else {
                    return Err(record.error(&field("from"), "a gpt turn without a human turn before it"));
                };
                pairs.push((q, value.trim().to_string()));
            }
            // System prompts carry no (question, answer) pair.
            "system" => {}
            other => {
                return Err(record.error(&field("from"), format!("unknown role `{other}` (expected human/user or gpt/assistant)")));
            }
        }
    }
    if question.is_some() {
        return Err(record.error("conversations", "ends with a human turn that has no answer"));
    }
    if pairs.is_empty() {
        return Err(record.error("conversations", "no (human, gpt) pair"));
    }
    Ok(pairs)
}

impl VqaDataset {
    /// LLaVA conversation JSON (LLaVA-OV, LLaVA-NeXT, PIVOT SFT): one sample per (human, gpt) pair
    /// of each record; `image` paths are relative to `image_root`. An optional record-level
    /// `category` string (written by `ShapesWorld::export`) becomes every sample's category.
    pub fn from_llava_json(json_path: impl AsRef<Path>, image_root: impl AsRef<Path>) -> Result<Self> {
        Self::from_llava_json_with(json_path, image_root, LoadOptions::default())
    }

    pub fn from_llava_json_with(
        json_path: impl AsRef<Path>,
        image_root: impl AsRef<Path>,
        options: LoadOptions,
    ) -> Result<Self> {
        let root = image_root.as_ref();
        let (samples, skipped) = load_records(json_path.as_ref(), Layout::Auto, &options, |record| {
            let pairs = conversation_pairs(record)?;
            let image = ImageSource::File(record.image(root, &options)?);
            let category = record.optional_string("category")?.unwrap_or_default().to_string();
            Ok(pairs
                .into_iter()
                .map(|(question, answer)| VqaSample { image: image.clone(), question, answer, category: category.clone() })
                .collect())
        })?;
        Ok(VqaDataset { samples, skipped })
    }
}

impl CaptionDataset {
    /// BLIP558K-style LLaVA pretraining JSON: the caption is the first gpt turn; the human turn
    /// (an instruction the `plain` template throws away) is ignored.
    pub fn from_llava_json(json_path: impl AsRef<Path>, image_root: impl AsRef<Path>) -> Result<Self> {
        Self::from_llava_json_with(json_path, image_root, LoadOptions::default())
    }

    pub fn from_llava_json_with(
        json_path: impl AsRef<Path>,
        image_root: impl AsRef<Path>,
        options: LoadOptions,
    ) -> Result<Self> {
        let root = image_root.as_ref();
        let (samples, skipped) = load_records(json_path.as_ref(), Layout::Auto, &options, |record| {
            let mut pairs = conversation_pairs(record)?;
            let image = ImageSource::File(record.image(root, &options)?);
            let (_, caption) = pairs.swap_remove(0);
            Ok(vec![CaptionSample { image, caption }])
        })?;
        Ok(CaptionDataset { samples, skipped })
    }

    /// Image–caption JSONL: `{"image": <path>, "caption": <text>}` per line (`text` is accepted
    /// for `caption`).
    pub fn from_jsonl(path: impl AsRef<Path>, image_root: impl AsRef<Path>) -> Result<Self> {
        Self::from_jsonl_with(path, image_root, LoadOptions::default())
    }

    pub fn from_jsonl_with(path: impl AsRef<Path>, image_root: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let root = image_root.as_ref();
        let (samples, skipped) = load_records(path.as_ref(), Layout::Auto, &options, |record| {
            let caption = record.string(&["caption", "text"])?.trim().to_string();
            let image = ImageSource::File(record.image(root, &options)?);
            Ok(vec![CaptionSample { image, caption }])
        })?;
        Ok(CaptionDataset { samples, skipped })
    }
}

impl PreferenceDataset {
    /// Preference pairs, one JSON object per line (RLAIF-V, MMPR: `image`, `question`, `chosen`,
    /// `rejected`), or PIVOT's DPO JSON list (`prompt` = `"<image>\n<question>"`), recognised by its
    /// leading `[`. `prompt` and `query` are accepted for `question`; `<image>` is removed; an
    /// optional `image_rejected` (PIVOT's image-counterfactual pairs: the rejected answer is
    /// scored with that image) is checked like `image`; an optional `category` is kept; other
    /// keys (`id`, `answer`, ...) are ignored.
    pub fn from_jsonl(path: impl AsRef<Path>, image_root: impl AsRef<Path>) -> Result<Self> {
        Self::from_jsonl_with(path, image_root, LoadOptions::default())
    }

    pub fn from_jsonl_with(path: impl AsRef<Path>, image_root: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let root = image_root.as_ref();
        let (samples, skipped) = load_records(path.as_ref(), Layout::Auto, &options, |record| {
            let question = strip_image_placeholder(record.string(&["question", "prompt", "query"])?);
            let chosen = record.string(&["chosen"])?.trim().to_string();
            let rejected = record.string(&["rejected"])?.trim().to_string();
            let category = record.optional_string("category")?.unwrap_or_default().to_string();
            let image = ImageSource::File(record.image(root, &options)?);
            let image_rejected = record.optional_image("image_rejected", root, &options)?.map(ImageSource::File);
            Ok(vec![PreferenceSample { image, question, chosen, rejected, category, image_rejected }])
        })?;
        Ok(PreferenceDataset { samples, skipped })
    }

    /// PIVOT's DPO JSON list; the same reader as [`PreferenceDataset::from_jsonl`], named for
    /// readability.
    pub fn from_json(path: impl AsRef<Path>, image_root: impl AsRef<Path>) -> Result<Self> {
        Self::from_jsonl(path, image_root)
    }
}
