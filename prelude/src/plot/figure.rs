//! A rendered figure: PNG bytes plus an SVG version, saved by extension and shown inline.

use crate::error::{PivotError, Result};
use crate::runtime::{MimeBundle, Rich, html_escape};
use base64::Engine;
use image::{ImageEncoder, RgbImage};
use std::path::Path;

/// A rendered plot or image grid.
#[derive(Debug, Clone)]
pub struct Figure {
    pub title: String,
    pub width: u32,
    pub height: u32,
    /// PNG-encoded raster.
    pub png: Vec<u8>,
    /// Vector version (for image grids: an SVG that embeds the PNG).
    pub svg: String,
}

pub(crate) fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| PivotError::invalid(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

impl Figure {
    /// Wraps an RGB image; the SVG embeds the PNG.
    pub fn from_image(title: impl Into<String>, img: &RgbImage) -> Result<Figure> {
        let (w, h) = img.dimensions();
        let png = encode_png(img.as_raw(), w, h)?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
             <image width=\"{w}\" height=\"{h}\" href=\"data:image/png;base64,{b64}\"/></svg>"
        );
        Ok(Figure { title: title.into(), width: w, height: h, png, svg })
    }

    pub fn png(&self) -> &[u8] {
        &self.png
    }

    pub fn svg(&self) -> &str {
        &self.svg
    }

    /// Decoded raster.
    pub fn to_image(&self) -> Result<RgbImage> {
        image::load_from_memory_with_format(&self.png, image::ImageFormat::Png)
            .map(|i| i.to_rgb8())
            .map_err(|e| PivotError::invalid(format!("PNG decoding failed: {e}")))
    }

    /// Writes `.png` or `.svg` according to the extension.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| PivotError::file(dir, e))?;
        }
        let res = match ext.as_deref() {
            Some("png") => std::fs::write(path, &self.png),
            Some("svg") => std::fs::write(path, &self.svg),
            _ => return Err(PivotError::file(path, "unknown figure format: use a .png or .svg extension")),
        };
        res.map_err(|e| PivotError::file(path, e))
    }

    /// `<img>` tag with the PNG inlined.
    pub fn to_html(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.png);
        format!(
            "<img alt=\"{}\" width=\"{}\" src=\"data:image/png;base64,{b64}\"/>",
            html_escape(&self.title),
            self.width
        )
    }
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Figure \"{}\" ({}×{} px; .save(\"x.png\"|\"x.svg\"))", self.title, self.width, self.height)
    }
}

impl Rich for Figure {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(self.to_string()).with_png(&self.png)
    }
}
