//! The built-in word vocabulary of the tiny language model preset.
//!
//! Every word the embedded `ShapesWorld` writes (captions, questions, answers, hallucinated
//! rejections) and the ChatML role words must be here, so that the tiny tokenizer never emits
//! an unknown token. A test in `data` checks this for generated text.

pub const TINY_VOCABULARY: &[&str] = &[
    // chat roles and the default system prompt
    "system", "user", "assistant", "You", "you", "are", "a", "helpful", ".",
    // punctuation
    ",", "?", "!", ":", ";", "'", "-",
    // numbers
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    // ShapesWorld: shapes, colours, sizes, textures
    "circle", "cross", "diamond", "square", "star", "triangle",
    "blue", "brown", "cyan", "green", "pink", "purple", "red", "yellow",
    "small", "large", "noisy", "striped", "checkered",
    // ShapesWorld: template words of captions, descriptions, questions and answers
    "A", "The", "This", "What", "Which", "How", "Where", "Is", "Describe",
    "the", "is", "of", "on", "in", "at", "to", "or", "and", "can", "there",
    "picture", "image", "shows", "background", "briefly",
    "colour", "shape", "shapes", "object", "size", "number", "many", "see",
    "relative", "left", "right", "above", "below",
    "top", "bottom", "center", "corner",
];

/// Splits text into the words of the tiny tokenizer: runs separated by whitespace, with every
/// ASCII punctuation character a word of its own ("red." → ["red", "."]).
pub fn tiny_words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    for chunk in text.split_whitespace() {
        let mut start = 0;
        for (i, c) in chunk.char_indices() {
            if c.is_ascii_punctuation() {
                if start < i {
                    words.push(&chunk[start..i]);
                }
                words.push(&chunk[i..i + 1]);
                start = i + 1;
            }
        }
        if start < chunk.len() {
            words.push(&chunk[start..]);
        }
    }
    words
}
