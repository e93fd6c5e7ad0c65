//! HTML pieces that reports of every layer share: a key–value table and a header-and-rows table.

use crate::runtime::html_escape;

/// A captioned two-column table, one `(key, value)` per row; both are escaped.
pub fn key_value_table(title: &str, rows: &[(String, String)]) -> String {
    let mut s = format!("<table class=\"pivot-report\"><caption style=\"text-align:left\"><b>{}</b></caption>", html_escape(title));
    for (k, v) in rows {
        s += &format!("<tr><th style=\"text-align:left\">{}</th><td>{}</td></tr>", html_escape(k), html_escape(v));
    }
    s + "</table>"
}

/// A captioned table with a header row; every cell is escaped. The first column is left-aligned
/// (labels), the others right-aligned (numbers); `note` goes under the table in small type.
pub fn grid_table(title: &str, header: &[String], rows: &[Vec<String>], note: Option<&str>) -> String {
    let cell = |tag: &str, c: usize, text: &str| {
        let align = if c == 0 { "left" } else { "right" };
        format!("<{tag} style=\"text-align:{align}\">{}</{tag}>", html_escape(text))
    };
    let mut s = format!("<table class=\"pivot-report\"><caption style=\"text-align:left\"><b>{}</b></caption><tr>", html_escape(title));
    for (c, h) in header.iter().enumerate() {
        s += &cell("th", c, h);
    }
    s += "</tr>";
    for row in rows {
        s += "<tr>";
        for (c, v) in row.iter().enumerate() {
            s += &cell("td", c, v);
        }
        s += "</tr>";
    }
    s += "</table>";
    if let Some(note) = note {
        s += &format!("<div style=\"font-size:smaller\">{}</div>", html_escape(note));
    }
    s
}

/// A fraction as a percentage with two decimals ("12.34%").
pub fn percent(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}
