//! `pivot-kernel install`: writes the kernelspec (kernel.json + logos) where Jupyter looks.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::engine::paths;

pub const KERNEL_NAME: &str = "pivot";

pub enum Location {
    User,
    SysPrefix,
    Prefix(PathBuf),
    Dir(PathBuf),
}

fn jupyter_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("JUPYTER_DATA_DIR") {
        return PathBuf::from(d);
    }
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("jupyter")
}

fn sys_prefix() -> anyhow::Result<PathBuf> {
    let out = std::process::Command::new(paths::python()).args(["-c", "import sys;print(sys.prefix)"]).output()?;
    if !out.status.success() {
        anyhow::bail!("cannot ask {} for sys.prefix", paths::python().display());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

pub fn kernel_dir(loc: &Location, name: &str) -> anyhow::Result<PathBuf> {
    Ok(match loc {
        Location::User => jupyter_data_dir().join("kernels").join(name),
        Location::SysPrefix => sys_prefix()?.join("share/jupyter/kernels").join(name),
        Location::Prefix(p) => p.join("share/jupyter/kernels").join(name),
        Location::Dir(d) => d.clone(),
    })
}

/// Writes the kernelspec and returns its directory.
pub fn install(loc: &Location, name: &str) -> anyhow::Result<PathBuf> {
    let dir = kernel_dir(loc, name)?;
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?.canonicalize()?;
    let mut env = serde_json::Map::new();
    // Pin what the kernel would otherwise discover relative to its build tree, so the spec keeps
    // working when started from any directory by any Jupyter.
    env.insert("PIVOT_PRELUDE".into(), json!(paths::prelude_dir().display().to_string()));
    env.insert("PIVOT_PYTHON".into(), json!(paths::python().display().to_string()));
    if let Some(c) = std::env::var_os("PIVOT_CACHE_DIR") {
        env.insert("PIVOT_CACHE_DIR".into(), json!(c.to_string_lossy()));
    }
    if let Ok(l) = std::env::var("LIBTORCH") {
        env.insert("LIBTORCH".into(), json!(l));
    }
    let spec = json!({
        "argv": [exe.display().to_string(), "kernel", "--connection-file", "{connection_file}"],
        "display_name": "Rust (PIVOT)",
        "language": "rust",
        "interrupt_mode": "message",
        "env": env,
        "metadata": {"debugger": false},
    });
    std::fs::write(dir.join("kernel.json"), serde_json::to_string_pretty(&spec)? + "\n")?;
    std::fs::write(dir.join("logo-32x32.png"), logo_png(32))?;
    std::fs::write(dir.join("logo-64x64.png"), logo_png(64))?;
    std::fs::write(dir.join("logo-svg.svg"), LOGO_SVG)?;
    Ok(dir)
}

pub fn uninstall(loc: &Location, name: &str) -> anyhow::Result<PathBuf> {
    let dir = kernel_dir(loc, name)?;
    if dir.join("kernel.json").exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(dir)
}

const LOGO_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">
<rect x="2" y="2" width="60" height="60" rx="12" fill="#b7410e"/>
<path d="M20 50V14h14a11 11 0 0 1 0 22H27v14z M27 20v10h7a5 5 0 0 0 0-10z" fill="#fff" fill-rule="evenodd"/>
</svg>
"##;

/// A rust-coloured rounded square with a white "P", drawn from the same geometry as the SVG.
pub fn logo_png(size: u32) -> Vec<u8> {
    let s = size as f64 / 64.0;
    let mut rgba = Vec::with_capacity((size * size * 4) as usize);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = ((x as f64 + 0.5) / s, (y as f64 + 0.5) / s);
            let in_rect = {
                let (cx, cy) = (fx.clamp(14.0, 50.0), fy.clamp(14.0, 50.0));
                ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt() <= 12.0 && (2.0..=62.0).contains(&fx) && (2.0..=62.0).contains(&fy)
            };
            let stem = (20.0..27.0).contains(&fx) && (14.0..50.0).contains(&fy);
            let bowl = {
                let d = ((fx - 34.0).powi(2) + (fy - 25.0).powi(2)).sqrt();
                let outer = (fx >= 20.0 && fx <= 34.0 && (14.0..36.0).contains(&fy)) || (fx > 34.0 && d <= 11.0);
                let inner = (fx >= 27.0 && fx <= 34.0 && (20.0..30.0).contains(&fy)) || (fx > 34.0 && d <= 5.0);
                outer && !inner
            };
            let px = if !in_rect {
                [0, 0, 0, 0]
            } else if stem || bowl {
                [255, 255, 255, 255]
            } else {
                [0xb7, 0x41, 0x0e, 255]
            };
            rgba.extend_from_slice(&px);
        }
    }
    encode_png(size, size, &rgba)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Minimal PNG writer (stored deflate blocks): logos are tiny, a compressor is not worth a
/// dependency.
fn encode_png(w: u32, h: u32, rgba: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    for row in rgba.chunks((w * 4) as usize) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        z.push(if i + 1 == chunks.len() { 1 } else { 0 });
        z.extend_from_slice(&(c.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
        z.extend_from_slice(c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    png
}

pub fn is_kernelspec_dir(p: &Path) -> bool {
    p.join("kernel.json").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_known_value() {
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn png_has_signature_and_iend() {
        let p = logo_png(32);
        assert!(p.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(p.ends_with(&[0xae, 0x42, 0x60, 0x82]));
    }
}
