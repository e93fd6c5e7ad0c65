//! `ShapesWorld::export`: the world as real files, readable by the real loaders.
//!
//! Layout under the export root (image paths in the JSON files are relative to the root):
//!
//! ```text
//! manifest.json                      seed, image size, counts, class names
//! images/<split>/<index>.png         scene images, shared by every task
//! masks/<split>/<index>.png          class masks, stored as-is (MaskEncoding::Identity)
//! classes/<split>/<class>/<index>.png  class-per-folder copy (hard links when possible)
//! captions_<split>.json              LLaVA/BLIP558K pretraining conversations
//! pairs_<split>.jsonl                {image, caption} descriptions (image_text_pairs)
//! vqa_<split>.json                   LLaVA conversations, one (question, answer) per record, + category
//! preferences_<split>.jsonl          {id, image, question, chosen, rejected, category}
//! dpo_<split>.json                   PIVOT DPO list {id, prompt: "<image>\n…", chosen, rejected, image, category}
//! ```

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::rng::{Stream, WorldRng};
use super::text::{self, CAPTION_PROMPT};
use super::world::ShapesWorld;
use super::Split;
use crate::error::{PivotError, Result};

/// Where an export lives, with the path of each file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapesExport {
    pub root: PathBuf,
    /// Images per split (train, val, test).
    pub counts: [usize; 3],
    pub class_names: Vec<String>,
    pub seg_class_names: Vec<String>,
}

impl ShapesExport {
    pub fn count(&self, split: Split) -> usize {
        self.counts[split as usize]
    }
    pub fn image_path(&self, split: Split, index: usize) -> PathBuf {
        self.root.join(relative_image(split, index))
    }
    pub fn images_dir(&self, split: Split) -> PathBuf {
        self.root.join("images").join(split.name())
    }
    pub fn masks_dir(&self, split: Split) -> PathBuf {
        self.root.join("masks").join(split.name())
    }
    pub fn classes_dir(&self, split: Split) -> PathBuf {
        self.root.join("classes").join(split.name())
    }
    pub fn captions_json(&self, split: Split) -> PathBuf {
        self.root.join(format!("captions_{split}.json"))
    }
    pub fn pairs_jsonl(&self, split: Split) -> PathBuf {
        self.root.join(format!("pairs_{split}.jsonl"))
    }
    pub fn vqa_json(&self, split: Split) -> PathBuf {
        self.root.join(format!("vqa_{split}.json"))
    }
    pub fn preferences_jsonl(&self, split: Split) -> PathBuf {
        self.root.join(format!("preferences_{split}.jsonl"))
    }
    pub fn dpo_json(&self, split: Split) -> PathBuf {
        self.root.join(format!("dpo_{split}.json"))
    }
}

fn stem(index: usize) -> String {
    format!("{index:06}")
}

fn relative_image(split: Split, index: usize) -> String {
    format!("images/{split}/{}.png", stem(index))
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> PivotError {
    PivotError::file(path, format!("cannot write: {e}"))
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| PivotError::file(path, format!("cannot create folder: {e}")))
}

fn save_png<P, C>(image: &image::ImageBuffer<P, C>, path: &Path) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    image.save_with_format(path, image::ImageFormat::Png).map_err(|e| io_error(path, e))
}

/// Writes `records` as a pretty JSON list (the layout of LLaVA's and PIVOT's files).
fn write_json_list(path: &Path, records: &[Value]) -> Result<()> {
    let file = fs::File::create(path).map_err(|e| io_error(path, e))?;
    let mut out = BufWriter::new(file);
    serde_json::to_writer_pretty(&mut out, records).map_err(|e| io_error(path, e))?;
    out.write_all(b"\n").and_then(|_| out.flush()).map_err(|e| io_error(path, e))
}

fn write_jsonl(path: &Path, records: &[Value]) -> Result<()> {
    let file = fs::File::create(path).map_err(|e| io_error(path, e))?;
    let mut out = BufWriter::new(file);
    for record in records {
        serde_json::to_writer(&mut out, record).map_err(|e| io_error(path, e))?;
        out.write_all(b"\n").map_err(|e| io_error(path, e))?;
    }
    out.flush().map_err(|e| io_error(path, e))
}

/// A second name for an exported image without a second copy where the file system allows.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        fs::remove_file(to).map_err(|e| io_error(to, e))?;
    }
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).map_err(|e| io_error(to, e))?;
    }
    Ok(())
}

impl ShapesWorld {
    /// Writes `config.export_counts` images per split and every task's data in real formats
    /// (layout in the module docs). Reading the files back with `VqaDataset::from_llava_json`,
    /// `PreferenceDataset::from_jsonl`, `CaptionDataset::from_llava_json`/`from_jsonl`,
    /// `ImageFolder::open` and `SegDataset::from_folders(.., MaskEncoding::Identity, ..)` gives the
    /// same samples as the in-memory methods.
    pub fn export(&self, dir: impl AsRef<Path>) -> Result<ShapesExport> {
        let root = dir.as_ref().to_path_buf();
        let export = ShapesExport {
            root: root.clone(),
            counts: self.config().export_counts,
            class_names: self.class_names(),
            seg_class_names: self.seg_class_names(),
        };
        create_dir(&root)?;
        for split in Split::ALL {
            self.export_split(&export, split)?;
        }
        let manifest = json!({
            "generator": "pivot ShapesWorld",
            "seed": self.config().seed,
            "image_size": self.config().image_size,
            "max_objects": self.config().max_objects,
            "counts": { "train": export.counts[0], "val": export.counts[1], "test": export.counts[2] },
            "class_names": export.class_names,
            "seg_class_names": export.seg_class_names,
            "seg_ignore_index": 255,
            "mask_encoding": "identity",
        });
        let path = root.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| io_error(&path, e))?;
        fs::write(&path, text + "\n").map_err(|e| io_error(&path, e))?;
        Ok(export)
    }

    fn export_split(&self, export: &ShapesExport, split: Split) -> Result<()> {
        let n = export.count(split);
        let seed = self.world_seed();
        let (images_dir, masks_dir, classes_dir) =
            (export.images_dir(split), export.masks_dir(split), export.classes_dir(split));
        // A previous, larger export must not leave images that the folder loaders would pick up.
        for dir in [&images_dir, &masks_dir, &classes_dir] {
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(|e| PivotError::file(dir, format!("cannot clear old export: {e}")))?;
            }
        }
        create_dir(&images_dir)?;
        create_dir(&masks_dir)?;
        for name in &export.class_names {
            create_dir(&classes_dir.join(name))?;
        }

        let (mut captions, mut pairs, mut vqa, mut preferences, mut dpo) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for index in 0..n {
            let rendered = self.render(split, index);
            let scene = &rendered.scene;
            let image_rel = relative_image(split, index);
            let image_path = export.root.join(&image_rel);
            let id = format!("shapes-{split}-{}", stem(index));
            save_png(rendered.image.as_ref(), &image_path)?;
            save_png(&rendered.mask, &masks_dir.join(format!("{}.png", stem(index))))?;
            let class_path = classes_dir.join(&export.class_names[scene.class]).join(format!("{}.png", stem(index)));
            link_or_copy(&image_path, &class_path)?;

            // The texts come from the same streams as the in-memory methods.
            let caption = text::caption(scene, &mut WorldRng::new(seed, split, index as u64, Stream::Caption));
            captions.push(json!({
                "id": id,
                "image": image_rel,
                "conversations": [
                    { "from": "human", "value": format!("<image>\n{CAPTION_PROMPT}") },
                    { "from": "gpt", "value": caption },
                ],
            }));
            pairs.push(json!({ "image": image_rel, "caption": text::description(scene) }));

            let qa = text::question(scene, &mut WorldRng::new(seed, split, index as u64, Stream::Question));
            let rejected = qa.hallucinated(&mut WorldRng::new(seed, split, index as u64, Stream::Hallucination));
            vqa.push(json!({
                "id": id,
                "image": image_rel,
                "category": qa.category,
                "conversations": [
                    { "from": "human", "value": format!("<image>\n{}", qa.question) },
                    { "from": "gpt", "value": qa.answer() },
                ],
            }));
            preferences.push(json!({
                "id": id,
                "image": image_rel,
                "question": qa.question,
                "chosen": qa.answer(),
                "rejected": rejected,
                "category": qa.category,
            }));
            dpo.push(json!({
                "id": id,
                "prompt": format!("<image>\n{}", qa.question),
                "chosen": qa.answer(),
                "rejected": rejected,
                "image": image_rel,
                "category": qa.category,
            }));
        }
        write_json_list(&export.captions_json(split), &captions)?;
        write_jsonl(&export.pairs_jsonl(split), &pairs)?;
        write_json_list(&export.vqa_json(split), &vqa)?;
        write_jsonl(&export.preferences_jsonl(split), &preferences)?;
        write_json_list(&export.dpo_json(split), &dpo)
    }
}
