//! Building blocks shared by the towers, the projector and the language model, plus a reader
//! for Hugging Face `config.json` fields that names the file and field on every error.

use crate::error::{PivotError, Result};
use serde_json::Value;
use tch::{Kind, Tensor, nn};

/// Weight init used for freshly built (preset) models: N(0, 0.02) like HF's `initializer_range`.
pub const INIT_STD: f64 = 0.02;

pub fn normal_init() -> nn::Init {
    nn::Init::Randn { mean: 0.0, stdev: INIT_STD }
}

/// `y = x Wᵀ + b` with HF's `weight`/`bias` names.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// Clones share the weights (a clone is what a recomputed layer keeps; see `model::recompute`).
impl Clone for Linear {
    fn clone(&self) -> Self {
        Linear { weight: self.weight.shallow_clone(), bias: self.bias.as_ref().map(Tensor::shallow_clone) }
    }
}

impl Linear {
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = p.var("weight", &[out_dim, in_dim], normal_init());
        let bias = bias.then(|| p.var("bias", &[out_dim], nn::Init::Const(0.0)));
        Linear { weight, bias }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// LayerNorm computed in fp32 whatever the model dtype, cast back afterwards.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

/// Clones share the weights.
impl Clone for LayerNorm {
    fn clone(&self) -> Self {
        LayerNorm { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone(), eps: self.eps }
    }
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        let weight = p.var("weight", &[dim], nn::Init::Const(1.0));
        let bias = p.var("bias", &[dim], nn::Init::Const(0.0));
        LayerNorm { weight, bias, eps }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        if kind == Kind::Float {
            return x.layer_norm([x.size()[x.dim() - 1]], Some(&self.weight), Some(&self.bias), self.eps, true);
        }
        let d = x.size()[x.dim() - 1];
        x.to_kind(Kind::Float)
            .layer_norm([d], Some(&self.weight.to_kind(Kind::Float)), Some(&self.bias.to_kind(Kind::Float)), self.eps, true)
            .to_kind(kind)
    }
}

/// Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale (HF order).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

/// Clones share the weights.
impl Clone for RmsNorm {
    fn clone(&self) -> Self {
        RmsNorm { weight: self.weight.shallow_clone(), eps: self.eps }
    }
}

impl RmsNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: p.var("weight", &[dim], nn::Init::Const(1.0)), eps }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

/// The activations named by HF `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// CLIP: x·σ(1.702x)
    QuickGelu,
    /// SigLIP: tanh approximation (`gelu_pytorch_tanh`)
    GeluTanh,
    /// exact erf GELU (`gelu`)
    Gelu,
    Silu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        }
    }
    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Gelu => x.gelu("none"),
            Activation::Silu => x.silu(),
        }
    }
}

/// Typed access to a JSON config with errors that name the source and the field.
pub struct ConfigReader<'a> {
    pub source: String,
    pub value: &'a Value,
}

impl<'a> ConfigReader<'a> {
    pub fn new(source: impl Into<String>, value: &'a Value) -> Self {
        ConfigReader { source: source.into(), value }
    }

    fn err(&self, field: &str, msg: impl std::fmt::Display) -> PivotError {
        PivotError::config(&self.source, field, msg)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    pub fn int(&self, field: &str, default: Option<i64>) -> Result<i64> {
        match self.get(field) {
            Some(v) => v.as_i64().ok_or_else(|| self.err(field, format!("expected an integer, found {v}"))),
            None => default.ok_or_else(|| self.err(field, "required field is missing")),
        }
    }

    pub fn positive(&self, field: &str, default: Option<i64>) -> Result<i64> {
        let v = self.int(field, default)?;
        if v <= 0 {
            return Err(self.err(field, format!("must be positive, found {v}")));
        }
        Ok(v)
    }

    pub fn float(&self, field: &str, default: Option<f64>) -> Result<f64> {
        match self.get(field) {
            Some(v) => v.as_f64().ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
            None => default.ok_or_else(|| self.err(field, "required field is missing")),
        }
    }

    pub fn boolean(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
            None => Ok(default),
        }
    }

    pub fn string(&self, field: &str, default: Option<&str>) -> Result<String> {
        match self.get(field) {
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
            None => default.map(str::to_string).ok_or_else(|| self.err(field, "required field is missing")),
        }
    }

    pub fn activation(&self, field: &str, default: &str) -> Result<Activation> {
        let name = self.string(field, Some(default))?;
        Activation::from_hf(&name).ok_or_else(|| {
            self.err(field, format!("unsupported activation `{name}` (expected quick_gelu, gelu_pytorch_tanh, gelu or silu)"))
        })
    }

    /// A square size given as an integer or as `[height, width]` with equal sides (HF and timm
    /// both accept either form).
    pub fn square(&self, field: &str, default: Option<i64>) -> Result<i64> {
        match self.get(field) {
            Some(Value::Array(a)) => {
                let sides: Vec<i64> = a.iter().filter_map(|v| v.as_i64()).collect();
                match sides.as_slice() {
                    [h, w] if h == w && *h > 0 => Ok(*h),
                    _ => Err(self.err(field, format!("expected a positive size or [size, size], found {}", Value::Array(a.clone())))),
                }
            }
            _ => self.positive(field, default),
        }
    }

    /// The raw JSON value of a field, if present and not null.
    pub fn value(&self, field: &str) -> Option<&'a Value> {
        self.get(field)
    }

    /// Checks that `a` is divisible by `b` (e.g. hidden size by heads) and names `field_a`.
    pub fn divisible(&self, field_a: &str, a: i64, field_b: &str, b: i64) -> Result<()> {
        if a % b != 0 {
            return Err(self.err(field_a, format!("{a} is not divisible by {field_b} = {b}")));
        }
        Ok(())
    }
}
