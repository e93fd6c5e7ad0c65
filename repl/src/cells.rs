//! Splitting a script into cells, and saving a session as a script.
//!
//! A script is run cell by cell, as if each cell had been typed at the prompt:
//! - if any line is a `// %%` marker (the VS Code / jupytext convention), the markers alone
//!   separate cells;
//! - otherwise a blank line ends a cell when the text so far is complete at top level (the
//!   kernel's `is_complete` scanner), so blank lines inside a `fn` or `impl` body never split it.
//!
//! A first line starting with `#!` (but not `#![`) is skipped, so scripts can be executable.

use pivot_engine::scan::{self, Completeness};

/// The separator `:save` writes and `split_cells` honours.
pub const MARKER: &str = "// %%";

fn is_marker(line: &str) -> bool {
    line.trim_start().starts_with(MARKER)
}

/// True when a cell holds nothing but whitespace and `//` comments.
fn is_blank(cell: &str) -> bool {
    cell.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || (t.starts_with("//") && !t.starts_with("///") && !t.starts_with("//!"))
    })
}

pub fn split_cells(src: &str) -> Vec<String> {
    let mut lines: Vec<&str> = src.lines().collect();
    if lines.first().is_some_and(|l| l.starts_with("#!") && !l.starts_with("#![")) {
        lines.remove(0);
    }
    let mut cells = Vec::new();
    let mut buf = String::new();
    let push = |buf: &mut String, cells: &mut Vec<String>| {
        let cell = buf.trim_matches('\n').to_string();
        if !is_blank(&cell) {
            cells.push(cell);
        }
        buf.clear();
    };
    if lines.iter().any(|l| is_marker(l)) {
        for line in lines {
            if is_marker(line) {
                push(&mut buf, &mut cells);
            } else {
                buf.push_str(line);
                buf.push('\n');
            }
        }
    } else {
        for line in lines {
            if line.trim().is_empty() && !buf.trim().is_empty() && !matches!(scan::check(&buf), Completeness::Incomplete { .. }) {
                push(&mut buf, &mut cells);
            } else {
                buf.push_str(line);
                buf.push('\n');
            }
        }
    }
    push(&mut buf, &mut cells);
    cells
}

/// A session's accepted inputs as a script that `pivot-repl FILE` and `:load FILE` run again.
pub fn to_script(inputs: &[String]) -> String {
    let mut s = String::from("// pivot-repl session; run with `pivot-repl FILE` or `:load FILE`\n");
    for input in inputs {
        s.push_str(MARKER);
        s.push('\n');
        s.push_str(input.trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_lines_split_only_complete_top_level_code() {
        let src = "#!/usr/bin/env pivot-repl\nlet x = 1;\nlet y = 2;\n\nfn f() {\n    let a = 1;\n\n    a\n}\n\n\n// just a comment\n\nf() + x";
        assert_eq!(split_cells(src), vec!["let x = 1;\nlet y = 2;", "fn f() {\n    let a = 1;\n\n    a\n}", "f() + x"]);
    }

    #[test]
    fn markers_win_over_blank_lines() {
        let src = "// %% setup\nlet x = 1;\n\nlet y = 2;\n// %%\nx + y\n";
        assert_eq!(split_cells(src), vec!["let x = 1;\n\nlet y = 2;", "x + y"]);
    }

    #[test]
    fn saved_scripts_round_trip() {
        let inputs = vec!["let v = vec![1,\n\n2];".to_string(), ":dep rand = \"0.9\"".to_string(), "v.len()".to_string()];
        assert_eq!(split_cells(&to_script(&inputs)), inputs);
    }

    #[test]
    fn strings_with_blank_lines_stay_together() {
        let src = "let s = \"a\n\nb\";\n\ns.len()";
        assert_eq!(split_cells(src), vec!["let s = \"a\n\nb\";", "s.len()"]);
    }
}
