//! Can text alone answer a preference set? The answer-word frequency baseline.
//!
//! A two-way choice measures seeing only if a model that never looks at the image is at chance.
//! The baseline here learns, on one set, how often each answer word is chosen under each question
//! template, and on another set picks the answer whose word was chosen more often: the text
//! statistic a small LM picks up first ("five" is never the count, "small" is usually right).
//! Written by hand: it is a count table, no library has this check.

use std::collections::HashMap;

use super::scene::{Colour, Shape};
use super::vocab::tiny_words;
use super::{PreferenceDataset, PreferenceSample};

/// Question words that name an object (colours, shapes, sizes, numbers): masked, so that the
/// template is the question's form, as in "What colour is the _ ?".
fn is_object_word(word: &str) -> bool {
    Colour::ALL.iter().any(|c| c.name() == word)
        || Shape::ALL.iter().any(|s| s.name() == word)
        || matches!(word, "small" | "large" | "zero" | "one" | "two" | "three" | "four" | "five")
}

fn template(sample: &PreferenceSample) -> String {
    let words: Vec<&str> = tiny_words(&sample.question).into_iter().map(|w| if is_object_word(w) { "_" } else { w }).collect();
    format!("{}|{}", sample.category, words.join(" "))
}

/// The first word where the two answers differ, for each (`None` when the texts are the same,
/// as in image-counterfactual pairs).
fn answer_words(sample: &PreferenceSample) -> Option<(String, String)> {
    let (c, r) = (tiny_words(&sample.chosen), tiny_words(&sample.rejected));
    for i in 0..c.len().max(r.len()) {
        let (a, b) = (c.get(i).copied().unwrap_or(""), r.get(i).copied().unwrap_or(""));
        if a != b {
            return Some((a.to_string(), b.to_string()));
        }
    }
    None
}

/// Accuracy on `test` of the text-only answer-word frequency baseline fitted on `train`: for
/// each (question template, answer word) it counts how often the word was chosen and rejected,
/// scores a word by the Laplace-smoothed share chosen, and picks the answer whose word scores
/// higher (a tie, or a pair whose texts do not differ, counts one half). NaN for an empty `test`.
/// 0.5 means that text statistics of this kind say nothing about which answer is right.
pub fn text_only_accuracy(train: &PreferenceDataset, test: &PreferenceDataset) -> f64 {
    let mut counts: HashMap<(String, String), (f64, f64)> = HashMap::new();
    for sample in &train.samples {
        if let Some((chosen, rejected)) = answer_words(sample) {
            let t = template(sample);
            counts.entry((t.clone(), chosen)).or_default().0 += 1.0;
            counts.entry((t, rejected)).or_default().1 += 1.0;
        }
    }
    let score = |t: &str, word: String| {
        let (c, r) = counts.get(&(t.to_string(), word)).copied().unwrap_or_default();
        (c + 1.0) / (c + r + 2.0)
    };
    let mut correct = 0.0;
    for sample in &test.samples {
        correct += match answer_words(sample) {
            None => 0.5,
            Some((chosen, rejected)) => {
                let t = template(sample);
                let (sc, sr) = (score(&t, chosen), score(&t, rejected));
                if sc > sr {
                    1.0
                } else if sc < sr {
                    0.0
                } else {
                    0.5
                }
            }
        };
    }
    if test.is_empty() { f64::NAN } else { correct / test.len() as f64 }
}
