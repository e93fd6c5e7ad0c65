//! In-memory input history for `history_request` (tail, range, search), per kernel process.

use serde_json::{json, Value};

#[derive(Default)]
pub struct History {
    /// (execution count, input, text/plain output if any)
    entries: Vec<(u64, String, Option<String>)>,
}

/// Jupyter's history session number for "this kernel run".
pub const SESSION: i64 = 1;

impl History {
    pub fn add(&mut self, count: u64, input: &str) {
        self.entries.push((count, input.to_string(), None));
    }

    pub fn set_output(&mut self, count: u64, output: String) {
        if let Some(e) = self.entries.iter_mut().rev().find(|e| e.0 == count) {
            e.2 = Some(output);
        }
    }

    fn item(&self, e: &(u64, String, Option<String>), output: bool) -> Value {
        if output {
            json!([SESSION, e.0, [e.1, e.2]])
        } else {
            json!([SESSION, e.0, e.1])
        }
    }

    pub fn reply(&self, req: &Value) -> Vec<Value> {
        let output = req.get("output").and_then(Value::as_bool).unwrap_or(false);
        let n = req.get("n").and_then(Value::as_u64).map(|n| n as usize);
        match req.get("hist_access_type").and_then(Value::as_str).unwrap_or("tail") {
            "range" => {
                let session = req.get("session").and_then(Value::as_i64).unwrap_or(0);
                if session != SESSION && session != 0 && session != -1 {
                    return vec![];
                }
                let start = req.get("start").and_then(Value::as_u64).unwrap_or(0);
                let stop = req.get("stop").and_then(Value::as_u64).unwrap_or(u64::MAX);
                self.entries.iter().filter(|e| e.0 >= start && e.0 < stop).map(|e| self.item(e, output)).collect()
            }
            "search" => {
                let pattern = req.get("pattern").and_then(Value::as_str).unwrap_or("*");
                let unique = req.get("unique").and_then(Value::as_bool).unwrap_or(false);
                let mut seen = std::collections::HashSet::new();
                let mut hits: Vec<Value> = Vec::new();
                // Newest first while collecting so `n` keeps the most recent matches.
                for e in self.entries.iter().rev() {
                    if !glob_match(pattern, &e.1) || (unique && !seen.insert(e.1.clone())) {
                        continue;
                    }
                    hits.push(self.item(e, output));
                    if n.is_some_and(|n| hits.len() >= n) {
                        break;
                    }
                }
                hits.reverse();
                hits
            }
            _ => {
                let n = n.unwrap_or(10);
                let skip = self.entries.len().saturating_sub(n);
                self.entries[skip..].iter().map(|e| self.item(e, output)).collect()
            }
        }
    }
}

/// fnmatch-style `*` and `?` matching over the whole input, as IPython's history search does.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_range_search() {
        let mut h = History::default();
        h.add(1, "let a = 1;");
        h.add(2, "a + 1");
        h.add(3, "a + 1");
        h.set_output(3, "2".into());
        assert_eq!(h.reply(&json!({"hist_access_type": "tail", "n": 2})).len(), 2);
        let r = h.reply(&json!({"hist_access_type": "range", "session": 1, "start": 2, "stop": 3}));
        assert_eq!(r, vec![json!([1, 2, "a + 1"])]);
        assert_eq!(h.reply(&json!({"hist_access_type": "search", "pattern": "*a*"})).len(), 3);
        assert_eq!(h.reply(&json!({"hist_access_type": "search", "pattern": "a +*", "unique": true})).len(), 1);
        let o = h.reply(&json!({"hist_access_type": "tail", "n": 1, "output": true}));
        assert_eq!(o[0], json!([1, 3, ["a + 1", "2"]]));
    }

    #[test]
    fn globbing() {
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a*d", "abc"));
    }
}
