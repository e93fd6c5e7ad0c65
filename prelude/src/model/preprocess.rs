//! Image preprocessing as each tower family was trained: CLIP resizes the shortest side and
//! centre-crops with CLIP's mean/std; SigLIP (and PIVOT's `square` aspect mode) resizes straight
//! to a square and maps pixels to [−1, 1]. DINOv2, ViT and timm towers bring their own settings
//! (`preprocessor_config.json` or timm's `pretrained_cfg`), read by [`ImageProcessor::from_hf_json`]
//! and [`ImageProcessor::from_timm_json`]: typically resize the shortest edge past the crop
//! (DINOv2: 256 for 224; timm: size / crop_pct) and centre-crop, with ImageNet's mean/std.

use crate::error::{PivotError, Result};
use image::{RgbImage, imageops::FilterType};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResizeMode {
    /// Resize to exactly size×size, aspect ratio not kept (SigLIP, PIVOT).
    Square,
    /// Resize the shortest side to `resize_shortest` (default `size`), then centre-crop
    /// size×size (CLIP, DINOv2, timm).
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
    /// Shortest edge before the centre crop, when larger than `size` (DINOv2's 256 for 224).
    #[serde(default)]
    pub resize_shortest: Option<u32>,
}

impl ImageProcessor {
    pub fn clip(size: i64) -> Self {
        ImageProcessor {
            size: size as u32,
            mode: ResizeMode::ShortestEdgeCenterCrop,
            resample: Resample::Bicubic,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            resize_shortest: None,
        }
    }

    pub fn siglip(size: i64) -> Self {
        ImageProcessor { size: size as u32, mode: ResizeMode::Square, resample: Resample::Bicubic, mean: [0.5; 3], std: [0.5; 3], resize_shortest: None }
    }

    /// ImageNet statistics, resize the shortest edge to `resize_shortest`, crop `size`, bicubic
    /// (DINOv2's `BitImageProcessor` defaults with 256 → 224).
    pub fn imagenet(size: i64, resize_shortest: i64) -> Self {
        ImageProcessor {
            size: size as u32,
            mode: ResizeMode::ShortestEdgeCenterCrop,
            resample: Resample::Bicubic,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            resize_shortest: Some(resize_shortest as u32),
        }
    }

    /// Reads HF `preprocessor_config.json` (CLIP/Bit/ViT/SigLIP image processors): `size`
    /// (`shortest_edge` or `height`/`width`), `do_center_crop` + `crop_size`, `resample`,
    /// `image_mean`, `image_std`. Errors name the file and field.
    pub fn from_hf_json(v: &serde_json::Value, source: &str) -> Result<Self> {
        let err = |field: &str, msg: String| PivotError::config(source, field, msg);
        let side = |field: &str| -> Result<Option<u32>> {
            let Some(x) = v.get(field).filter(|x| !x.is_null()) else { return Ok(None) };
            if let Some(n) = x.as_u64() {
                return Ok(Some(n as u32));
            }
            if let Some(n) = x.get("shortest_edge").and_then(|n| n.as_u64()) {
                return Ok(Some(n as u32));
            }
            match (x.get("height").and_then(|n| n.as_u64()), x.get("width").and_then(|n| n.as_u64())) {
                (Some(h), Some(w)) if h == w => Ok(Some(h as u32)),
                _ => Err(err(field, format!("expected an integer, {{\"shortest_edge\": n}} or a square {{\"height\", \"width\"}}, found {x}"))),
            }
        };
        let shortest = v.get("size").and_then(|x| x.get("shortest_edge")).is_some();
        let size = side("size")?.ok_or_else(|| err("size", "required field is missing".into()))?;
        let crop = v.get("do_center_crop").and_then(|x| x.as_bool()).unwrap_or(shortest);
        let resample = match v.get("resample").and_then(|x| x.as_i64()).unwrap_or(3) {
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            other => return Err(err("resample", format!("PIL filter {other} is not supported (2 bilinear, 3 bicubic)"))),
        };
        let triple = |field: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(field).filter(|x| !x.is_null()) {
                None => Ok(default),
                Some(x) => {
                    let vals: Vec<f32> = x.as_array().map(|a| a.iter().filter_map(|n| n.as_f64()).map(|n| n as f32).collect()).unwrap_or_default();
                    <[f32; 3]>::try_from(vals).map_err(|_| err(field, format!("expected three numbers, found {x}")))
                }
            }
        };
        let normalize = v.get("do_normalize").and_then(|x| x.as_bool()).unwrap_or(true);
        let (mean, std) = if normalize { (triple("image_mean", IMAGENET_MEAN)?, triple("image_std", IMAGENET_STD)?) } else { ([0.0; 3], [1.0; 3]) };
        Ok(match (shortest, crop) {
            (true, true) => {
                let out = side("crop_size")?.unwrap_or(size);
                ImageProcessor { size: out, mode: ResizeMode::ShortestEdgeCenterCrop, resample, mean, std, resize_shortest: Some(size) }
            }
            (true, false) => {
                return Err(err("do_center_crop", "a shortest-edge resize without a centre crop gives non-square images; not supported".into()));
            }
            (false, _) => ImageProcessor { size, mode: ResizeMode::Square, resample, mean, std, resize_shortest: None },
        })
    }

    /// timm's evaluation transform from a `pretrained_cfg`: resize the shortest edge to
    /// ⌊size / crop_pct⌋, centre-crop `size` (`input_size`, else `image_size`), with its
    /// `interpolation`, `mean` and `std` (timm's defaults: 0.875, bicubic, ImageNet).
    pub fn from_timm_json(cfg: &serde_json::Value, image_size: i64, source: &str) -> Result<Self> {
        let err = |field: &str, msg: String| PivotError::config(source, field, msg);
        let size = match cfg.get("input_size").and_then(|x| x.as_array()) {
            Some(a) if a.len() == 3 && a[1] == a[2] => a[1].as_u64().ok_or_else(|| err("input_size", format!("expected [c, h, w], found {:?}", a)))? as u32,
            Some(a) => return Err(err("input_size", format!("expected a square [c, size, size], found {a:?}"))),
            None => image_size as u32,
        };
        let crop_pct = cfg.get("crop_pct").and_then(|x| x.as_f64()).unwrap_or(0.875);
        if !(crop_pct > 0.0 && crop_pct <= 1.0) {
            return Err(err("crop_pct", format!("expected a fraction in (0, 1], found {crop_pct}")));
        }
        let mode = cfg.get("crop_mode").and_then(|x| x.as_str()).unwrap_or("center");
        if mode != "center" {
            return Err(err("crop_mode", format!("only `center` is supported, found `{mode}`")));
        }
        let resample = match cfg.get("interpolation").and_then(|x| x.as_str()).unwrap_or("bicubic") {
            "bilinear" => Resample::Bilinear,
            "bicubic" => Resample::Bicubic,
            other => return Err(err("interpolation", format!("`{other}` is not supported (bilinear, bicubic)"))),
        };
        let triple = |field: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match cfg.get(field).filter(|x| !x.is_null()) {
                None => Ok(default),
                Some(x) => {
                    let vals: Vec<f32> = x.as_array().map(|a| a.iter().filter_map(|n| n.as_f64()).map(|n| n as f32).collect()).unwrap_or_default();
                    <[f32; 3]>::try_from(vals).map_err(|_| err(field, format!("expected three numbers, found {x}")))
                }
            }
        };
        Ok(ImageProcessor {
            size,
            mode: ResizeMode::ShortestEdgeCenterCrop,
            resample,
            mean: triple("mean", IMAGENET_MEAN)?,
            std: triple("std", IMAGENET_STD)?,
            resize_shortest: Some((size as f64 / crop_pct).floor() as u32),
        })
    }

    /// The `pretrained_cfg` fields timm reads for this processor.
    pub fn to_timm_json(&self, channels: i64) -> serde_json::Value {
        let crop_pct = match (self.mode, self.resize_shortest) {
            (ResizeMode::ShortestEdgeCenterCrop, Some(r)) => {
                // timm floors size / crop_pct: nudge a ratio that would round just under r.
                let exact = self.size as f64 / r as f64;
                if (self.size as f64 / exact).floor() as u32 == r { exact } else { self.size as f64 / (r as f64 + 0.5) }
            }
            _ => 1.0,
        };
        serde_json::json!({
            "input_size": [channels, self.size, self.size],
            "interpolation": match self.resample { Resample::Bilinear => "bilinear", Resample::Bicubic => "bicubic" },
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": self.mean,
            "std": self.std,
        })
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
                let target = self.resize_shortest.unwrap_or(s).max(s);
                let scale = target as f64 / w.min(h) as f64;
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
                o.insert("size".into(), serde_json::json!({"shortest_edge": self.resize_shortest.unwrap_or(self.size)}));
                o.insert("do_center_crop".into(), true.into());
                o.insert("crop_size".into(), serde_json::json!({"height": self.size, "width": self.size}));
            }
        }
        v
    }
}
