//! Image preprocessing as each tower family was trained: CLIP resizes the shortest side and
//! centre-crops with CLIP's mean/std; SigLIP (and PIVOT's `square` aspect mode) resizes straight
//! to a square and maps pixels to [−1, 1].

use crate::error::{PivotError, Result};
use image::{RgbImage, imageops::FilterType};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResizeMode {
    /// Resize to exactly size×size, aspect ratio not kept (SigLIP, PIVOT).
    Square,
    /// Resize the shortest side to `size`, then centre-crop size×size (CLIP).
    ShortestEdgeCenterCrop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resample {
    Bilinear,
    Bicubic,
}

impl Resample {
    fn filter(self) -> FilterType {
        match self {
            Resample::Bilinear => FilterType::Triangle,
            Resample::Bicubic => FilterType::CatmullRom,
        }
    }
    /// PIL's enum value, as HF processors store it.
    fn pil(self) -> i64 {
        match self {
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessor {
    pub size: u32,
    pub mode: ResizeMode,
    pub resample: Resample,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessor {
    pub fn clip(size: i64) -> Self {
        ImageProcessor {
            size: size as u32,
            mode: ResizeMode::ShortestEdgeCenterCrop,
            resample: Resample::Bicubic,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    pub fn siglip(size: i64) -> Self {
        ImageProcessor { size: size as u32, mode: ResizeMode::Square, resample: Resample::Bicubic, mean: [0.5; 3], std: [0.5; 3] }
    }

    /// Resizes (and crops) one image to size×size; an image already that size is untouched.
    pub fn resize(&self, img: &RgbImage) -> RgbImage {
        let s = self.size;
        if img.width() == s && img.height() == s {
            return img.clone();
        }
        match self.mode {
            ResizeMode::Square => image::imageops::resize(img, s, s, self.resample.filter()),
            ResizeMode::ShortestEdgeCenterCrop => {
                let (w, h) = (img.width(), img.height());
                let scale = s as f64 / w.min(h) as f64;
                let (nw, nh) = (((w as f64 * scale).round() as u32).max(s), ((h as f64 * scale).round() as u32).max(s));
                let resized = image::imageops::resize(img, nw, nh, self.resample.filter());
                image::imageops::crop_imm(&resized, (nw - s) / 2, (nh - s) / 2, s, s).to_image()
            }
        }
    }

    /// One image as a normalised [3, size, size] f32 tensor.
    pub fn preprocess_one(&self, img: &RgbImage) -> Tensor {
        let img = self.resize(img);
        let s = self.size as i64;
        let raw = Tensor::from_slice(img.as_raw()).view([s, s, 3]).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
        let mean = Tensor::from_slice(&self.mean).view([3, 1, 1]);
        let std = Tensor::from_slice(&self.std).view([3, 1, 1]);
        (raw - mean) / std
    }

    /// A batch of images as [B, 3, size, size] f32 on the CPU.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Tensor> {
        if images.is_empty() {
            return Err(PivotError::invalid("preprocess needs at least one image"));
        }
        let tensors: Vec<Tensor> = images.iter().map(|i| self.preprocess_one(i)).collect();
        Ok(Tensor::stack(&tensors, 0))
    }

    /// Inverse of the normalisation, for showing what the tower saw: [3,H,W] → RGB image.
    pub fn to_image(&self, pixels: &Tensor) -> Result<RgbImage> {
        let (c, h, w) = pixels.size3().map_err(|_| PivotError::invalid("to_image expects [3, H, W]"))?;
        if c != 3 {
            return Err(PivotError::invalid(format!("to_image expects 3 channels, got {c}")));
        }
        let mean = Tensor::from_slice(&self.mean).view([3, 1, 1]);
        let std = Tensor::from_slice(&self.std).view([3, 1, 1]);
        let x = ((pixels.to_device(tch::Device::Cpu).to_kind(Kind::Float) * std + mean) * 255.0)
            .clamp(0.0, 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0])
            .contiguous();
        let data = Vec::<u8>::try_from(x.flatten(0, -1))?;
        RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| PivotError::invalid("pixel buffer size mismatch"))
    }

    /// HF `preprocessor_config.json` for this processor.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let common = serde_json::json!({
            "do_resize": true,
            "resample": self.resample.pil(),
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": self.mean,
            "image_std": self.std,
            "do_convert_rgb": true,
        });
        let mut v = common;
        let o = v.as_object_mut().expect("object literal");
        match self.mode {
            ResizeMode::Square => {
                o.insert("image_processor_type".into(), "SiglipImageProcessor".into());
                o.insert("size".into(), serde_json::json!({"height": self.size, "width": self.size}));
            }
            ResizeMode::ShortestEdgeCenterCrop => {
                o.insert("image_processor_type".into(), "CLIPImageProcessor".into());
                o.insert("size".into(), serde_json::json!({"shortest_edge": self.size}));
                o.insert("do_center_crop".into(), true.into());
                o.insert("crop_size".into(), serde_json::json!({"height": self.size, "width": self.size}));
            }
        }
        v
    }
}
