//! Samples → model inputs without the model: the ChatML / `plain` templates over the tokenizer
//! and the tower's image processor. A [`Batcher`] holds nothing but `Sync` pieces borrowed from
//! an [`Mllm`](super::Mllm), so the trainers collate the next micro-batch on a worker thread
//! (like a PyTorch DataLoader worker with `pin_memory`) while the model computes the current one.

use super::preprocess::ImageProcessor;
use super::tokenizer::{IM_END, IM_START, Tokenizer};
use crate::error::Result;
use image::RgbImage;
use tch::{Device, Tensor};

/// Label of positions that carry no loss.
pub const IGNORE_INDEX: i64 = -100;
/// Placeholder id of the image inside token ids (LLaVA's `IMAGE_TOKEN_INDEX`).
pub const IMAGE_TOKEN_INDEX: i64 = -200;

/// One tokenised conversation: ids with exactly one [`IMAGE_TOKEN_INDEX`], labels aligned.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// What `Mllm::encode_chat`, `Mllm::encode_caption` and `Mllm::preprocess` need; see
/// [`Mllm::batcher`](super::Mllm::batcher). `Send + Sync`: it may cross threads.
#[derive(Clone, Debug)]
pub struct Batcher<'a> {
    pub tokenizer: &'a Tokenizer,
    pub system_prompt: &'a str,
    pub processor: ImageProcessor,
    /// The model's device: a batch bound for CUDA is pinned for an asynchronous copy.
    pub device: Device,
}

/// A collated micro-batch: the images and one token sequence per row.
pub struct Batch {
    /// [B_images, 3, S, S] f32: on the CPU (pinned when bound for CUDA) until [`Batch::to_device`].
    pub pixels: Tensor,
    pub seqs: Vec<Encoded>,
}

impl Batcher<'_> {
    fn tokens(&self, text: &str) -> Result<Vec<i64>> {
        self.tokenizer.encode(text)
    }

    /// See [`Mllm::encode_chat`](super::Mllm::encode_chat).
    pub fn encode_chat(&self, question: &str, answer: Option<&str>) -> Result<Encoded> {
        let question = question.replace("<image>", "");
        let question = question.trim();
        let mut ids = self.tokens(&format!("{IM_START}system\n{}{IM_END}\n{IM_START}user\n", self.system_prompt))?;
        ids.push(IMAGE_TOKEN_INDEX);
        ids.extend(self.tokens(&format!("\n{question}{IM_END}\n{IM_START}assistant\n"))?);
        let mut labels = vec![IGNORE_INDEX; ids.len()];
        if let Some(answer) = answer {
            let mut a = self.tokens(answer.trim())?;
            a.push(self.tokenizer.im_end);
            labels.extend(&a);
            ids.extend(&a);
            let tail = self.tokens("\n")?;
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, tail.len()));
            ids.extend(tail);
        }
        Ok(Encoded { ids, labels })
    }

    /// See [`Mllm::encode_caption`](super::Mllm::encode_caption).
    pub fn encode_caption(&self, caption: &str) -> Result<Encoded> {
        let mut ids = vec![IMAGE_TOKEN_INDEX];
        let text = self.tokens(&format!("{}\n", caption.trim()))?;
        let mut labels = vec![IGNORE_INDEX];
        labels.extend(&text);
        ids.extend(text);
        Ok(Encoded { ids, labels })
    }

    /// The tower's preprocessing: [B, 3, S, S] f32 on the CPU.
    pub fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.processor.preprocess(images)
    }

    /// Preprocesses `images` into a batch with `seqs`, pinned when the model is on CUDA.
    pub fn batch(&self, images: &[RgbImage], seqs: Vec<Encoded>) -> Result<Batch> {
        let pixels = self.pixels(images)?;
        // `_pin_memory`: tch always passes a device, and `pin_memory(device)` then prints a
        // deprecation warning on every call.
        let pixels = if self.device.is_cuda() { pixels.f_internal_pin_memory(self.device)? } else { pixels };
        Ok(Batch { pixels, seqs })
    }
}

impl Batch {
    /// Moves the pixels to `device`: asynchronous from pinned memory, free on the CPU.
    pub fn to_device(self, device: Device) -> Result<Batch> {
        let pixels = self.pixels.f_to_device_(device, self.pixels.kind(), true, false)?;
        Ok(Batch { pixels, seqs: self.seqs })
    }
}
