//! Lexical completeness check for Rust input, shared by Jupyter `is_complete_request` and the
//! REPL's multi-line validator. It only tracks brackets, strings, char literals and comments, so
//! it answers in microseconds and never needs the compiler; rustc reports everything else.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    /// Ready to run.
    Complete,
    /// More input is needed; `indent` is a suggestion for the next line.
    Incomplete { indent: String },
    /// Cannot become valid by appending text (e.g. a closing bracket without an opener).
    Invalid,
}

/// Classifies `src`. Lines starting with `:` (evcxr commands) are complete on their own.
pub fn check(src: &str) -> Completeness {
    let chars: Vec<char> = src.chars().collect();
    let mut stack: Vec<char> = Vec::new();
    let mut i = 0;
    let n = chars.len();
    let mut at_line_start = true;
    while i < n {
        let c = chars[i];
        if at_line_start {
            // Skip indentation, then evcxr `:commands` take the whole line.
            let mut j = i;
            while j < n && (chars[j] == ' ' || chars[j] == '\t') {
                j += 1;
            }
            if j < n && chars[j] == ':' && stack.is_empty() && !(j + 1 < n && chars[j + 1] == ':') {
                while j < n && chars[j] != '\n' {
                    j += 1;
                }
                i = j;
                continue;
            }
            at_line_start = false;
        }
        match c {
            '\n' => at_line_start = true,
            '/' if i + 1 < n && chars[i + 1] == '/' => {
                while i < n && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if i + 1 < n && chars[i + 1] == '*' => {
                let mut depth = 1;
                i += 2;
                while i < n && depth > 0 {
                    if chars[i] == '/' && i + 1 < n && chars[i + 1] == '*' {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && i + 1 < n && chars[i + 1] == '/' {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                if depth > 0 {
                    return incomplete(stack.len());
                }
                continue;
            }
            '"' => match skip_string(&chars, i + 1) {
                Some(end) => {
                    i = end;
                    continue;
                }
                None => return incomplete(stack.len()),
            },
            'r' | 'b' | 'c' if !prev_is_ident(&chars, i) => {
                if let Some(res) = raw_or_prefixed_string(&chars, i) {
                    match res {
                        Some(end) => {
                            i = end;
                            continue;
                        }
                        None => return incomplete(stack.len()),
                    }
                }
            }
            '\'' => {
                // Char literal or lifetime/label. `'\..'` and `'x'` are literals.
                if i + 1 < n && chars[i + 1] == '\\' {
                    let mut j = i + 2;
                    while j < n && chars[j] != '\'' && chars[j] != '\n' {
                        j += 1;
                    }
                    if j >= n {
                        return incomplete(stack.len());
                    }
                    i = j + 1;
                    continue;
                } else if i + 2 < n && chars[i + 2] == '\'' {
                    i += 3;
                    continue;
                }
            }
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(want) {
                    return Completeness::Invalid;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if stack.is_empty() { Completeness::Complete } else { incomplete(stack.len()) }
}

fn incomplete(depth: usize) -> Completeness {
    Completeness::Incomplete { indent: "    ".repeat(depth.max(1)) }
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// Returns the index after a closing `"`, or None when the string is unterminated.
fn skip_string(chars: &[char], mut i: usize) -> Option<usize> {
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Handles `r"…"`, `r#"…"#`, `b"…"`, `br"…"`, `c"…"`, `cr#"…"#`, `b'x'`. Returns None when the
/// text at `i` is not such a literal (an identifier), Some(None) when it is unterminated.
fn raw_or_prefixed_string(chars: &[char], i: usize) -> Option<Option<usize>> {
    let n = chars.len();
    let mut j = i;
    if chars[j] == 'b' || chars[j] == 'c' {
        j += 1;
        if j < n && chars[j] == '\'' && chars[i] == 'b' {
            // Byte literal b'x' or b'\n'.
            let mut k = j + 1;
            if k < n && chars[k] == '\\' {
                k += 2;
            } else {
                k += 1;
            }
            while k < n && chars[k] != '\'' {
                k += 1;
            }
            return Some(if k < n { Some(k + 1) } else { None });
        }
        if j < n && chars[j] == '"' {
            return Some(skip_string(chars, j + 1));
        }
    }
    if j < n && chars[j] == 'r' {
        j += 1;
        let mut hashes = 0;
        while j < n && chars[j] == '#' {
            hashes += 1;
            j += 1;
        }
        if j < n && chars[j] == '"' {
            let mut k = j + 1;
            while k < n {
                if chars[k] == '"' && (0..hashes).all(|h| k + 1 + h < n && chars[k + 1 + h] == '#') {
                    return Some(Some(k + 1 + hashes));
                }
                k += 1;
            }
            return Some(None);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(s: &str) -> bool {
        matches!(check(s), Completeness::Incomplete { .. })
    }

    #[test]
    fn complete_inputs() {
        for s in [
            "let x = 1;",
            "fn f() { 1 }",
            "println!(\"{}\", \"(\");",
            "let c = '(';",
            "fn f<'a>(x: &'a str) -> &'a str { x }",
            "let s = r#\"a \" ( \"#;",
            "// (\nlet x = 1;",
            "/* { */ let y = 2;",
            ":dep foo = { version = \"1\"",
            "let b = b'{';",
            "let p = std::f64::consts::PI;",
            "'outer: loop { break 'outer; }",
            "",
        ] {
            assert_eq!(check(s), Completeness::Complete, "{s:?}");
        }
    }

    #[test]
    fn incomplete_inputs() {
        for s in ["fn foo(", "if true {", "let s = \"abc", "let v = vec![1,\n2,", "/* open", "let r = r#\"x\"", "let c = '\\"] {
            assert!(inc(s), "{s:?}");
        }
        assert_eq!(check("fn f() {\n if x {"), Completeness::Incomplete { indent: "        ".into() });
    }

    #[test]
    fn invalid_inputs() {
        for s in ["fn foo() }", ")", "let x = (1];"] {
            assert_eq!(check(s), Completeness::Invalid, "{s:?}");
        }
    }
}
