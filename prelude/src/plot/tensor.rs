//! How a `Tensor` shows itself as a cell's value.
//!
//! Without this, evcxr prints a tensor through `Debug` (`Tensor[[2, 2], Float]`, no values), and
//! only after a first build of the cell has failed for want of an `evcxr_display`: every cell
//! ending in a tensor was compiled twice. As a `Rich` value it builds once and shows its values
//! the way researchers read them in PyTorch: the layout of `torch.Tensor.__repr__` (precision 4,
//! integer / fixed / scientific mode chosen over the shown values, 80 columns, summarised with
//! "..." past 1,000 elements keeping 3 edge items per dimension). The suffixes use tch's names
//! (`dtype=BFloat16`, `device=Cuda(0)`, `requires_grad=true`), since those are what a cell writes,
//! and a summarised tensor also shows its `size`.
//!
//! Only the shown elements leave the device: a summarised CUDA tensor is cut down to its edge items
//! there before the copy.

use std::panic::{AssertUnwindSafe, catch_unwind};

use tch::{Device, Kind, TchError, Tensor};

use crate::runtime::{MimeBundle, Rich};

/// PyTorch's default print options.
const THRESHOLD: i64 = 1000;
const EDGE_ITEMS: i64 = 3;
const PRECISION: usize = 4;
const LINE_WIDTH: usize = 80;
const PREFIX: &str = "tensor(";

impl Rich for Tensor {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(tensor_repr(self))
    }
}

/// The text a cell shows for a tensor (also usable in `println!("{}", tensor_repr(&t))`).
/// Never panics: a tensor it cannot read (complex, quantised, a failing device) is shown as
/// `Tensor[size, kind]`, like tch's `Debug`.
pub fn tensor_repr(t: &Tensor) -> String {
    if !t.defined() {
        return "Tensor[Undefined]".to_string();
    }
    match catch_unwind(AssertUnwindSafe(|| repr(t))) {
        Ok(Ok(s)) => s,
        _ => {
            let kind = t.f_kind().map(|k| format!("{k:?}")).unwrap_or_else(|e| e.to_string());
            format!("Tensor[{:?}, {kind}]", t.size())
        }
    }
}

/// The shown elements, flattened row-major, as the type they are formatted in.
enum Values {
    Float(Vec<f64>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

fn repr(t: &Tensor) -> Result<String, TchError> {
    let kind = t.f_kind()?;
    let size = t.size();
    let numel: i64 = size.iter().product();
    let mut suffixes = Vec::new();
    if t.device() != Device::Cpu {
        suffixes.push(format!("device={:?}", t.device()));
    }
    let body = if numel == 0 {
        if size.len() != 1 {
            suffixes.push(format!("size={size:?}"));
        }
        "[]".to_string()
    } else {
        let summarize = numel > THRESHOLD;
        if summarize {
            suffixes.push(format!("size={size:?}"));
        }
        let values = shown_values(t, kind, &size, summarize)?;
        let fmt = Formatter::new(&values);
        Layout { size: &size, summarize, fmt: &fmt, values: &values }.block(0, 0, PREFIX.len())
    };
    if !matches!(kind, Kind::Float | Kind::Int64 | Kind::Bool | Kind::ComplexFloat) {
        suffixes.push(format!("dtype={kind:?}"));
    }
    if t.requires_grad() {
        suffixes.push("requires_grad=true".to_string());
    }
    Ok(add_suffixes(format!("{PREFIX}{body}"), &suffixes, PREFIX.len()))
}

/// Whether a dimension of `n` elements is cut to its edge items (then shown with "...").
fn is_cut(n: i64, summarize: bool) -> bool {
    summarize && n > 2 * EDGE_ITEMS
}

/// Cuts a summarised tensor down to its edge items on its own device, then copies what is shown
/// to the host, flattened row-major.
fn shown_values(t: &Tensor, kind: Kind, size: &[i64], summarize: bool) -> Result<Values, TchError> {
    let _no_grad = tch::no_grad_guard();
    let mut s = t.f_detach()?;
    for (d, &n) in size.iter().enumerate() {
        if is_cut(n, summarize) {
            let idx: Vec<i64> = (0..EDGE_ITEMS).chain(n - EDGE_ITEMS..n).collect();
            let idx = Tensor::from_slice(&idx).f_to_device(s.device())?;
            s = s.f_index_select(d as i64, &idx)?;
        }
    }
    let flat = s.f_to_device(Device::Cpu)?.f_contiguous()?.f_reshape([-1])?;
    let n = flat.size()[0] as usize;
    let values = match kind {
        Kind::Half
        | Kind::Float
        | Kind::Double
        | Kind::BFloat16
        | Kind::Float8e5m2
        | Kind::Float8e4m3fn
        | Kind::Float8e5m2fnuz
        | Kind::Float8e4m3fnuz => {
            let mut v = vec![0f64; n];
            flat.f_to_kind(Kind::Double)?.f_copy_data(&mut v, n)?;
            Values::Float(v)
        }
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64 => {
            let mut v = vec![0i64; n];
            flat.f_to_kind(Kind::Int64)?.f_copy_data(&mut v, n)?;
            Values::Int(v)
        }
        Kind::Bool => {
            let mut v = vec![0i64; n];
            flat.f_to_kind(Kind::Int64)?.f_copy_data(&mut v, n)?;
            Values::Bool(v.into_iter().map(|x| x != 0).collect())
        }
        other => return Err(TchError::Kind(format!("no value display for {other:?}"))),
    };
    Ok(values)
}

/// PyTorch's `_Formatter`: one width and one mode for every element of the tensor.
struct Formatter {
    int_mode: bool,
    sci_mode: bool,
    width: usize,
}

impl Formatter {
    fn new(values: &Values) -> Self {
        let mut f = Formatter { int_mode: true, sci_mode: false, width: 1 };
        match values {
            Values::Int(v) => f.width = v.iter().map(|x| x.to_string().len()).max().unwrap_or(1),
            Values::Bool(v) => f.width = if v.iter().any(|b| !b) { 5 } else { 4 },
            Values::Float(v) => {
                let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite() && *x != 0.0).collect();
                if finite.is_empty() {
                    return f;
                }
                let min = finite.iter().fold(f64::INFINITY, |m, x| m.min(x.abs()));
                let max = finite.iter().fold(0f64, |m, x| m.max(x.abs()));
                f.int_mode = finite.iter().all(|x| x.ceil() == *x);
                f.sci_mode = max / min > 1000.0 || max > 1.0e8 || min < 1.0e-4;
                f.width = finite
                    .iter()
                    .map(|&x| match (f.sci_mode, f.int_mode) {
                        (true, _) => sci(x).len(),
                        (false, true) => format!("{x:.0}").len() + 1,
                        (false, false) => format!("{x:.PRECISION$}").len(),
                    })
                    .max()
                    .unwrap_or(1);
            }
        }
        f
    }

    fn float(&self, x: f64) -> String {
        let s = if x.is_nan() {
            "nan".to_string()
        } else if x.is_infinite() {
            if x > 0.0 { "inf".to_string() } else { "-inf".to_string() }
        } else if self.sci_mode {
            sci(x)
        } else if self.int_mode {
            format!("{x:.0}.")
        } else {
            format!("{x:.PRECISION$}")
        };
        format!("{s:>w$}", w = self.width)
    }

    fn element(&self, values: &Values, i: usize) -> String {
        match values {
            Values::Float(v) => self.float(v[i]),
            Values::Int(v) => format!("{:>w$}", v[i], w = self.width),
            Values::Bool(v) => format!("{:>w$}", if v[i] { "True" } else { "False" }, w = self.width),
        }
    }
}

/// Python's `{:.4e}`: `1.2346e+03`, exponent signed and at least two digits.
fn sci(x: f64) -> String {
    let s = format!("{x:.PRECISION$e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let e: i32 = exp.parse().unwrap_or(0);
            format!("{mantissa}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
        }
        None => s,
    }
}

/// PyTorch's `_tensor_str_with_formatter` over the shown values.
struct Layout<'a> {
    size: &'a [i64],
    summarize: bool,
    fmt: &'a Formatter,
    values: &'a Values,
}

impl Layout<'_> {
    /// How many elements of dimension `d` the shown values hold.
    fn shown(&self, d: usize) -> usize {
        if is_cut(self.size[d], self.summarize) { 2 * EDGE_ITEMS as usize } else { self.size[d] as usize }
    }

    /// Elements of the shown tensor under one index prefix start at `offset`; `dim` is the
    /// dimension being laid out and `indent` the column its opening bracket sits at.
    fn block(&self, dim: usize, offset: usize, indent: usize) -> String {
        let rank = self.size.len();
        if rank == 0 {
            return self.fmt.element(self.values, 0);
        }
        let stride: usize = (dim + 1..rank).map(|d| self.shown(d)).product();
        let n = self.shown(dim);
        let cut = is_cut(self.size[dim], self.summarize);
        let mut items: Vec<String> = Vec::with_capacity(n + 1);
        for i in 0..n {
            if cut && i == EDGE_ITEMS as usize {
                items.push(if dim + 1 == rank { " ...".to_string() } else { "...".to_string() });
            }
            items.push(if dim + 1 == rank {
                self.fmt.element(self.values, offset + i)
            } else {
                self.block(dim + 1, offset + i * stride, indent + 1)
            });
        }
        if dim + 1 == rank {
            let per_line = (LINE_WIDTH.saturating_sub(indent) / (self.fmt.width + 2)).max(1);
            let lines: Vec<String> = items.chunks(per_line).map(|c| c.join(", ")).collect();
            format!("[{}]", lines.join(&format!(",\n{}", " ".repeat(indent + 1))))
        } else {
            let sep = format!(",{}{}", "\n".repeat(rank - dim - 1), " ".repeat(indent + 1));
            format!("[{}]", items.join(&sep))
        }
    }
}

/// PyTorch's `_add_suffixes`, including how it counts the last line's length.
fn add_suffixes(body: String, suffixes: &[String], indent: usize) -> String {
    let mut out = body;
    let mut last_line = match out.rfind('\n') {
        Some(p) => out.len() - p + 1,
        None => out.len() + 2,
    };
    for s in suffixes {
        if last_line + s.len() + 2 > LINE_WIDTH {
            out.push_str(&format!(",\n{}{s}", " ".repeat(indent)));
            last_line = indent + s.len();
        } else {
            out.push_str(", ");
            out.push_str(s);
            last_line += s.len() + 2;
        }
    }
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected texts are `repr()` of the same tensors in PyTorch 2.11, with the suffixes in tch's
    // names (and `size` added where a tensor is summarised).
    fn check(t: Tensor, expected: &str) {
        assert_eq!(tensor_repr(&t), expected, "\n{}", tensor_repr(&t));
    }

    #[test]
    fn scalars_vectors_and_modes() {
        check(Tensor::from(3.5f32), "tensor(3.5000)");
        check(Tensor::from(7i64), "tensor(7)");
        check(Tensor::from_slice(&[1i64, -20, 300]), "tensor([  1, -20, 300])");
        check(Tensor::ones([2, 2], (Kind::Float, Device::Cpu)), "tensor([[1., 1.],\n        [1., 1.]])");
        check(
            Tensor::from_slice(&[0.1f32, -1.25, 2.5, 3.14159]).reshape([2, 2]),
            "tensor([[ 0.1000, -1.2500],\n        [ 2.5000,  3.1416]])",
        );
        check(Tensor::from_slice(&[1e-5f32, 1.0, 12345.678]), "tensor([1.0000e-05, 1.0000e+00, 1.2346e+04])");
        check(
            Tensor::from_slice(&[1.5f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0]),
            "tensor([1.5000,    nan,    inf,   -inf, 0.0000])",
        );
        check(Tensor::from_slice(&[true, false, true]), "tensor([ True, False,  True])");
        check(Tensor::from_slice(&[true, true]), "tensor([True, True])");
        check(Tensor::zeros([3], (Kind::Float, Device::Cpu)), "tensor([0., 0., 0.])");
        check(Tensor::from_slice(&[-0.0f32, 2.0]), "tensor([-0., 2.])");
        check(Tensor::from_slice(&[0.5f32, 1.5, 2.5]), "tensor([0.5000, 1.5000, 2.5000])");
        check(
            Tensor::arange(8, (Kind::Int64, Device::Cpu)).reshape([2, 2, 2]),
            "tensor([[[0, 1],\n         [2, 3]],\n\n        [[4, 5],\n         [6, 7]]])",
        );
    }

    #[test]
    fn long_rows_wrap_at_80_columns() {
        check(
            Tensor::arange(30, (Kind::Float, Device::Cpu)) / 7.0,
            "tensor([0.0000, 0.1429, 0.2857, 0.4286, 0.5714, 0.7143, 0.8571, 1.0000, 1.1429,\n        \
             1.2857, 1.4286, 1.5714, 1.7143, 1.8571, 2.0000, 2.1429, 2.2857, 2.4286,\n        \
             2.5714, 2.7143, 2.8571, 3.0000, 3.1429, 3.2857, 3.4286, 3.5714, 3.7143,\n        \
             3.8571, 4.0000, 4.1429])",
        );
    }

    #[test]
    fn empty_tensors_and_dtype_suffixes() {
        check(Tensor::zeros([0, 3], (Kind::Float, Device::Cpu)), "tensor([], size=[0, 3])");
        check(Tensor::zeros([0], (Kind::Float, Device::Cpu)), "tensor([])");
        check(Tensor::from_slice(&[1.5f32, 2.25]).to_kind(Kind::BFloat16), "tensor([1.5000, 2.2500], dtype=BFloat16)");
        check(Tensor::from_slice(&[1.0f32, 2.0]).reshape([1, 2]).to_kind(Kind::Half), "tensor([[1., 2.]], dtype=Half)");
        check(Tensor::from_slice(&[1i32, 2]), "tensor([1, 2], dtype=Int)");
        check(Tensor::from_slice(&[0.5f64]), "tensor([0.5000], dtype=Double)");
        check(Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true), "tensor([1., 1.], requires_grad=true)");
    }

    #[test]
    fn large_tensors_are_summarised_with_their_size() {
        check(
            Tensor::arange(2000, (Kind::Int64, Device::Cpu)).reshape([40, 50]),
            "tensor([[   0,    1,    2,  ...,   47,   48,   49],\n        \
             [  50,   51,   52,  ...,   97,   98,   99],\n        \
             [ 100,  101,  102,  ...,  147,  148,  149],\n        \
             ...,\n        \
             [1850, 1851, 1852,  ..., 1897, 1898, 1899],\n        \
             [1900, 1901, 1902,  ..., 1947, 1948, 1949],\n        \
             [1950, 1951, 1952,  ..., 1997, 1998, 1999]], size=[40, 50])",
        );
        check(Tensor::arange(1001, (Kind::Int64, Device::Cpu)), "tensor([   0,    1,    2,  ...,  998,  999, 1000], size=[1001])");
        check(
            Tensor::arange(2400, (Kind::Float, Device::Cpu)).reshape([2, 3, 400]) / 3.0,
            "tensor([[[0.0000e+00, 3.3333e-01, 6.6667e-01,  ..., 1.3233e+02,\n          \
             1.3267e+02, 1.3300e+02],\n         \
             [1.3333e+02, 1.3367e+02, 1.3400e+02,  ..., 2.6567e+02,\n          \
             2.6600e+02, 2.6633e+02],\n         \
             [2.6667e+02, 2.6700e+02, 2.6733e+02,  ..., 3.9900e+02,\n          \
             3.9933e+02, 3.9967e+02]],\n\n        \
             [[4.0000e+02, 4.0033e+02, 4.0067e+02,  ..., 5.3233e+02,\n          \
             5.3267e+02, 5.3300e+02],\n         \
             [5.3333e+02, 5.3367e+02, 5.3400e+02,  ..., 6.6567e+02,\n          \
             6.6600e+02, 6.6633e+02],\n         \
             [6.6667e+02, 6.6700e+02, 6.6733e+02,  ..., 7.9900e+02,\n          \
             7.9933e+02, 7.9967e+02]]], size=[2, 3, 400])",
        );
    }

    #[test]
    fn unreadable_tensors_fall_back_to_size_and_kind() {
        assert_eq!(tensor_repr(&Tensor::new()), "Tensor[Undefined]");
        let c = Tensor::ones([2], (Kind::ComplexFloat, Device::Cpu));
        assert_eq!(tensor_repr(&c), "Tensor[[2], ComplexFloat]");
    }

    #[test]
    fn a_tensor_is_a_rich_value() {
        let b = Tensor::from(2i64).mime_bundle();
        assert_eq!(b.plain_text(), "tensor(2)");
    }
}
