"""papermill parameters for Rust notebooks (the "pivot" kernel; evcxr's "rust" kernel too).

Rust is statically typed and evcxr keeps each top-level `let` with the type it was compiled with,
so an injected `let steps = 20;` (an `i32`) would break every later cell that uses `steps` as a
`usize`. The translator therefore reads the notebook's `parameters` cell (papermill hands it over
through `inspect` right before it asks for the injected code) and writes each value in the form of
the declared type:

    let steps: usize = 20;            // parameters cell: let steps: usize = 6;
    let lr: f64 = 1.0;                // let lr: f64 = 1e-3;        (-p lr 1 -> 1.0)
    let out_dir: String = String::from("/tmp/x");   // let out_dir = String::from("out");
    let tags: Vec<String> = vec![String::from("a")];
    let limit: Option<usize> = None;

Types with a literal form: the integer types, f32/f64, bool, char, String, &str, PathBuf,
Option<T> and Vec<T> of those. A parameter whose type has none (`let device = Device::Cpu;`,
`let device: Device = ...`) takes a string value as Rust source: `-p device 'Device::Cuda(0)'`.
A parameter the cell does not declare gets the plain literal of its value (str -> String::from,
int -> integer, float -> float with a decimal point, bool, list -> vec![...]); None has no Rust
literal and is an error unless the declared type is an Option.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from papermill.exceptions import PapermillException
from papermill.models import Parameter
from papermill.translators import Translator, papermill_translators

__all__ = ["RustTranslator", "RustTranslationError", "register", "Decl", "parse_parameters", "rust_literal", "rust_string", "codify_for_notebook"]

INT_TYPES = {
    "i8": (-(2**7), 2**7 - 1), "i16": (-(2**15), 2**15 - 1), "i32": (-(2**31), 2**31 - 1),
    "i64": (-(2**63), 2**63 - 1), "i128": (-(2**127), 2**127 - 1), "isize": (-(2**63), 2**63 - 1),
    "u8": (0, 2**8 - 1), "u16": (0, 2**16 - 1), "u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1),
    "u128": (0, 2**128 - 1), "usize": (0, 2**64 - 1),
}
FLOAT_TYPES = {"f32", "f64"}
STRING_TYPES = {"String", "std::string::String", "alloc::string::String"}
STR_TYPES = {"&str", "&'static str"}
PATH_TYPES = {"PathBuf", "std::path::PathBuf"}
KEYWORDS = set(
    "as async await break const continue crate dyn else enum extern false fn for if impl in let loop match mod move mut "
    "pub ref return self Self static struct super trait true type unsafe use where while abstract become box do final "
    "macro override priv try typeof unsized virtual yield".split()
)
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class RustTranslationError(PapermillException):
    """A value that has no Rust literal of the parameter's type."""


# --------------------------------------------------------------------------------------------
# The parameters cell
# --------------------------------------------------------------------------------------------


@dataclass
class Decl:
    """One `let` of a parameters cell."""

    name: str
    type: Optional[str]  # declared or inferred Rust type; None when unknown
    default: str  # the initializer's source
    help: str  # trailing `//` comment
    expr: bool = False  # initializer is an expression with no literal form (`Device::Cpu`)


def _statements(src: str):
    """Top-level `;`-terminated statements of `src`, comments removed, each with the `//` comment
    that follows it on the same line."""
    out = []  # [text, help]
    buf: list[str] = []
    depth = 0
    i, n = 0, len(src)
    last_end_line = None  # line of the last `;`, to attach a trailing comment
    line = 0
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            buf.append(c)
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            if out and last_end_line == line and not "".join(buf).strip():
                out[-1][1] = src[i + 2 : j].strip().lstrip("/!").strip()
            i = j
        elif src.startswith("/*", i):
            level, i = 1, i + 2
            while i < n and level:
                if src.startswith("/*", i):
                    level, i = level + 1, i + 2
                elif src.startswith("*/", i):
                    level, i = level - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
            buf.append(" ")
        elif c == '"' or (c in "rb" and not (i and (src[i - 1].isalnum() or src[i - 1] == "_")) and re.match(r'(b?r#*"|b")', src[i:])):
            m = re.match(r'(b?r)(#*)"', src[i:])
            if m:  # raw string: no escapes, ends at `"` + the same number of #
                end = src.find('"' + m.group(2), i + len(m.group(0)))
                j = n if end < 0 else end + 1 + len(m.group(2))
            else:
                j = i + (2 if c == "b" else 1)
                while j < n and src[j] != '"':
                    j += 2 if src[j] == "\\" else 1
                j += 1
            buf.append(src[i:j])
            line += src[i:j].count("\n")
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}') or a lifetime ('static): copy either as is.
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", src[i:])
            j = i + (len(m.group(0)) if m else 1)
            buf.append(src[i:j])
            i = j
        elif c in "([{":
            depth += 1
            buf.append(c)
            i += 1
        elif c in ")]}":
            depth -= 1
            buf.append(c)
            i += 1
        elif c == ";" and depth == 0:
            out.append(["".join(buf).strip(), ""])
            buf = []
            last_end_line = line
            i += 1
        else:
            buf.append(c)
            i += 1
    return [(t, h) for t, h in out if t]


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Splits on `sep` outside brackets and strings."""
    parts, buf, depth, i = [], [], 0, 0
    while i < len(s):
        c = s[i]
        if c == '"':
            j = i + 1
            while j < len(s) and s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            buf.append(s[i : j + 1])
            i = j + 1
            continue
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(buf).strip())
            buf = []
        else:
            buf.append(c)
        i += 1
    if "".join(buf).strip():
        parts.append("".join(buf).strip())
    return parts


_INT_LIT = re.compile(r"-?(?:0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+|[0-9][0-9_]*)(_?(?:[iu](?:8|16|32|64|128|size)))?\Z")
_FLOAT_LIT = re.compile(r"-?[0-9][0-9_]*(?:(\.[0-9][0-9_]*)?(?:[eE][+-]?[0-9_]+)(_?f(?:32|64))?|\.[0-9][0-9_]*(_?f(?:32|64))?|\.|(_?f(?:32|64)))\Z")


def infer_type(expr: str) -> tuple[Optional[str], bool]:
    """(type, is_expression) of an initializer without a type annotation. An unsuffixed integer
    literal is (None, False): its type is whatever evcxr inferred, so it is replaced by a plain one."""
    e = expr.strip()
    if e in ("true", "false"):
        return "bool", False
    m = _INT_LIT.match(e)
    if m:
        return (m.group(1).lstrip("_") if m.group(1) else "{integer}"), False
    m = _FLOAT_LIT.match(e)
    if m:
        suffix = next((g for g in m.groups()[1:] if g), None)
        return (suffix.lstrip("_") if suffix else "f64"), False
    if re.match(r'"|r#*"', e):
        return "&str", False
    if re.match(r"'", e):
        return "char", False
    if re.match(r"(std::string::)?String::(from|new)\s*\(|format!\s*[(\[{]", e) or re.search(r"\.to_(string|owned)\(\)\Z", e):
        return "String", False
    if re.match(r"(std::path::)?PathBuf::from\s*\(", e):
        return "PathBuf", False
    if e == "None":
        return "Option<_>", False
    m = re.match(r"Some\s*\((.*)\)\Z", e, re.S)
    if m:
        inner, is_expr = infer_type(m.group(1))
        return (f"Option<{inner or '_'}>", False) if not is_expr else (None, True)
    m = re.match(r"vec!\s*\[(.*)\]\Z", e, re.S)
    if m:
        items = _split_top(m.group(1))
        if not items or ";" in m.group(1):
            return "Vec<_>", False
        inner, is_expr = infer_type(items[0])
        return (f"Vec<{inner or '_'}>", False) if not is_expr else (None, True)
    return None, True


def normalize_type(t: str) -> str:
    t = re.sub(r"\s+", " ", t.strip())
    return re.sub(r"\s*([<>,&\[\];()])\s*", r"\1", t)


def parse_parameters(source: str) -> list[Decl]:
    """Every `let` of a parameters cell, with its declared (or inferred) type."""
    decls = []
    for text, help_ in _statements(source):
        m = re.match(r"let\s+(?:mut\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*([^=]+?))?\s*=(?!=)\s*(.+)\Z", text, re.S)
        if not m:
            continue
        name, declared, init = m.group(1), m.group(2), m.group(3).strip()
        if declared:
            t = normalize_type(declared)
            decls.append(Decl(name, t, init, help_, expr=not _has_literal_form(t)))
        else:
            t, is_expr = infer_type(init)
            decls.append(Decl(name, t, init, help_, expr=is_expr))
    return decls


def _has_literal_form(t: str) -> bool:
    if t in INT_TYPES or t in FLOAT_TYPES or t in STRING_TYPES or t in STR_TYPES or t in PATH_TYPES or t in ("bool", "char", "_", "{integer}"):
        return True
    m = re.match(r"(?:std::option::)?Option<(.*)>\Z|(?:std::vec::)?Vec<(.*)>\Z", t)
    return bool(m) and _has_literal_form(m.group(1) or m.group(2))


# --------------------------------------------------------------------------------------------
# Literals
# --------------------------------------------------------------------------------------------


def rust_string(s: str) -> str:
    """A Rust string literal ("...") for `s`: quotes, backslashes and control characters escaped,
    printable Unicode kept as is."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0xD800 <= o <= 0xDFFF:
            raise RustTranslationError(f"string {s!r} holds a lone surrogate (U+{o:04X}), which Rust strings cannot hold")
        elif not ch.isprintable():
            out.append(f"\\u{{{o:x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _char(name: str, v: Any) -> str:
    if not isinstance(v, str) or len(v) != 1:
        raise RustTranslationError(f"parameter {name!r} is a char: give one character, not {v!r}")
    body = rust_string(v)[1:-1]
    return "'" + ("\\'" if v == "'" else body.replace('\\"', '"')) + "'"


def _float(name: str, v: Any, t: str = "f64") -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise RustTranslationError(f"parameter {name!r} is {t}: {v!r} is not a number")
    try:
        f = float(v)
    except ValueError:
        raise RustTranslationError(f"parameter {name!r} is {t}: {v!r} is not a number") from None
    if math.isnan(f):
        return f"{t}::NAN"
    if math.isinf(f):
        return f"{t}::INFINITY" if f > 0 else f"{t}::NEG_INFINITY"
    s = repr(f)  # shortest round-trip form: 0.1, 1e-05, 1e+20, 3.0
    mantissa, _, exp = s.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + (f"e{int(exp)}" if exp else "")


def _int(name: str, v: Any, t: Optional[str]) -> str:
    if isinstance(v, bool):
        raise RustTranslationError(f"parameter {name!r} is {t or 'an integer'}: got the bool {v!r}")
    if isinstance(v, float):
        if not v.is_integer():
            raise RustTranslationError(f"parameter {name!r} is {t}: {v!r} is not an integer")
        v = int(v)
    elif isinstance(v, str):
        try:
            v = int(v.replace("_", ""), 0)
        except ValueError:
            raise RustTranslationError(f"parameter {name!r} is {t}: {v!r} is not an integer") from None
    elif not isinstance(v, int):
        raise RustTranslationError(f"parameter {name!r} is {t}: {v!r} is not an integer")
    if t in INT_TYPES:
        lo, hi = INT_TYPES[t]
        if not lo <= v <= hi:
            raise RustTranslationError(f"parameter {name!r} is {t}: {v} is out of range [{lo}, {hi}]")
    return str(v)


def _bool(name: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower()
    raise RustTranslationError(f"parameter {name!r} is bool: {v!r} is not true or false")


def _scalar_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise RustTranslationError(f"{v!r} is not a string")


def _untyped(name: str, v: Any) -> tuple[str, Optional[str]]:
    """(literal, type annotation or None) of a value with no declared type."""
    if v is None:
        raise RustTranslationError(
            f"parameter {name!r} is None: Rust has no null. Declare it `let {name}: Option<T> = None;` in the "
            "parameters cell, or leave it out"
        )
    if isinstance(v, bool):
        return _bool(name, v), "bool"
    if isinstance(v, int):
        return str(v), None
    if isinstance(v, float):
        return _float(name, v), "f64"
    if isinstance(v, str):
        return f"String::from({rust_string(v)})", "String"
    if isinstance(v, (list, tuple)):
        if not v:
            raise RustTranslationError(f"parameter {name!r}: an empty list needs its type: declare `let {name}: Vec<T> = vec![];`")
        if all(isinstance(x, bool) for x in v):
            t = "bool"
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            t = "_"
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            t = "f64"
        elif all(isinstance(x, str) for x in v):
            t = "String"
        else:
            raise RustTranslationError(f"parameter {name!r}: a Rust Vec holds one type, {v!r} mixes several")
        return rust_literal(name, v, f"Vec<{t}>"), (f"Vec<{t}>" if t != "_" else None)
    if isinstance(v, dict):
        raise RustTranslationError(f"parameter {name!r}: dict values have no Rust literal; pass scalars or lists")
    raise RustTranslationError(f"parameter {name!r}: no Rust literal for {type(v).__name__} {v!r}")


def rust_literal(name: str, value: Any, rust_type: Optional[str] = None) -> str:
    """The Rust expression for `value` as a `rust_type` (None or "_": the value's own literal)."""
    t = normalize_type(rust_type) if rust_type else None
    if t is None or t == "_":
        return _untyped(name, value)[0]
    m = re.match(r"(?:std::option::)?Option<(.*)>\Z", t)
    if m:
        return "None" if value is None else f"Some({rust_literal(name, value, m.group(1))})"
    if value is None:
        raise RustTranslationError(f"parameter {name!r} is {t}: None has no {t} literal (declare it Option<{t}>)")
    m = re.match(r"(?:std::vec::)?Vec<(.*)>\Z", t)
    if m:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RustTranslationError(f"parameter {name!r} is {t}: give a list, not {value!r}")
        inner = m.group(1)
        if inner in ("_", "") and any(isinstance(x, float) for x in value):
            inner = "f64"
        return "vec![" + ", ".join(rust_literal(name, x, inner) for x in value) + "]"
    if t in INT_TYPES or t == "{integer}":
        return _int(name, value, t if t in INT_TYPES else None)
    if t in FLOAT_TYPES:
        return _float(name, value, t)
    if t == "bool":
        return _bool(name, value)
    if t == "char":
        return _char(name, value)
    if isinstance(value, (list, tuple, dict)):
        raise RustTranslationError(f"parameter {name!r} is {t}: {value!r} has no {t} literal")
    if t in STRING_TYPES:
        return f"String::from({rust_string(_scalar_str(value))})"
    if t in STR_TYPES:
        return rust_string(_scalar_str(value))
    if t in PATH_TYPES:
        return f"std::path::PathBuf::from({rust_string(_scalar_str(value))})"
    # A type with no literal form (Device, a struct): a string is Rust source.
    if isinstance(value, str):
        if not value.strip():
            raise RustTranslationError(f"parameter {name!r} is {t}: an empty string is not a Rust expression")
        return value.strip()
    return _untyped(name, value)[0]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not IDENT.match(name) or name in KEYWORDS:
        raise RustTranslationError(f"parameter name {name!r} is not a Rust identifier")


def _annotation(t: Optional[str]) -> Optional[str]:
    """`t` if it can be written as a `let` annotation (no `_` placeholder, not `{integer}`)."""
    if not t or "{" in t or re.search(r"(?<![A-Za-z0-9_])_(?![A-Za-z0-9_])", t):
        return None
    return t


def let_statement(name: str, value: Any, decl: Optional[Decl] = None) -> str:
    """`let name: T = literal;` for a parameter, typed as its declaration says."""
    _check_name(name)
    if decl is None:
        lit, ann = _untyped(name, value)
    elif decl.expr and isinstance(value, str):
        # The declared type (Device, a struct) has no literal form: the string is Rust source.
        if not value.strip():
            raise RustTranslationError(f"parameter {name!r} is {decl.type or decl.default}: an empty string is not a Rust expression")
        lit, ann = value.strip(), _annotation(decl.type)
    elif decl.expr:
        lit, ann = _untyped(name, value)
        ann = _annotation(decl.type) or ann
    else:
        lit, ann = rust_literal(name, value, decl.type), _annotation(decl.type)
    return f"let {name}: {ann} = {lit};" if ann else f"let {name} = {lit};"


# --------------------------------------------------------------------------------------------
# papermill
# --------------------------------------------------------------------------------------------


class RustTranslator(Translator):
    """papermill's translator for Rust. `inspect` (which papermill calls on the `parameters` cell
    right before `codify`) records the declared types; `codify` uses and then forgets them."""

    _declared: dict[str, Decl] = {}

    @classmethod
    def comment(cls, cmt_str):
        return f"// {cmt_str}".strip()

    @classmethod
    def assign(cls, name, str_val):
        return f"let {name} = {str_val};"

    @classmethod
    def translate_str(cls, val):
        return f"String::from({rust_string(val)})"

    @classmethod
    def translate_escaped_str(cls, str_val):
        return rust_string(str(str_val))

    @classmethod
    def translate_none(cls, val):
        raise RustTranslationError("None has no Rust literal: declare the parameter as an Option<T>")

    @classmethod
    def translate_float(cls, val):
        return _float("value", val)

    @classmethod
    def translate_list(cls, val):
        return rust_literal("value", val)

    @classmethod
    def translate_dict(cls, val):
        return rust_literal("value", val)

    @classmethod
    def inspect(cls, parameters_cell):
        source = parameters_cell.source if hasattr(parameters_cell, "source") else parameters_cell["source"]
        if isinstance(source, list):
            source = "".join(source)
        decls = parse_parameters(source)
        cls._declared = {d.name: d for d in decls}
        return [Parameter(name=d.name, inferred_type_name=d.type or "None", default=d.default, help=d.help) for d in decls]

    @classmethod
    def codify(cls, parameters, comment="Parameters", declared: Optional[dict[str, Decl]] = None):
        if declared is None:
            declared, cls._declared = cls._declared, {}
        lines = [cls.comment(comment)]
        for name, val in parameters.items():
            lines.append(let_statement(name, val, declared.get(name)))
        return "\n".join(lines) + "\n"


def codify_for_notebook(nb, parameters: dict, comment: str = "Parameters") -> str:
    """The injected cell's source for `parameters`, typed from `nb`'s `parameters` cell."""
    cell = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    declared = {}
    if cell is not None:
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        declared = {d.name: d for d in parse_parameters(source)}
    return RustTranslator.codify(parameters, comment, declared=declared)


def register() -> None:
    """Registers RustTranslator with papermill for the kernel "pivot" and the language "rust"."""
    papermill_translators.register("rust", RustTranslator)
    papermill_translators.register("pivot", RustTranslator)
    # Any other translator declared in the `papermill.translators` group (papermill has no loader).
    try:
        import entrypoints

        for ep in entrypoints.get_group_all("papermill.translators"):
            if not ep.module_name.startswith("papermill_rust"):
                papermill_translators.register(ep.name, ep.load())
    except Exception:  # pragma: no cover - a broken third-party entry point must not break papermill
        pass


register()
