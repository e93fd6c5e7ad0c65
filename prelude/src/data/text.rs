//! The world's texts: captions, descriptions, questions and answers.
//!
//! Answers are template sentences with one visual fact as a single word ("The circle is red ."),
//! so a hallucinated answer differs from the true one in exactly that word — the kind of
//! near-miss RLAIF-V and MMPR pairs contain. Words are separated by spaces, punctuation included,
//! so the tiny word-level tokenizer and a human reader split them the same way.

use super::rng::WorldRng;
use super::scene::{Colour, Scene, SceneObject, Shape, Size};

/// The instruction of the world's captioning records (exported as the human turn; LLaVA's
/// `plain` pretraining template discards it).
pub const CAPTION_PROMPT: &str = "Describe the image briefly .";

const NUMBERS: [&str; 6] = ["zero", "one", "two", "three", "four", "five"];

/// A question and its answer sentence `prefix fact suffix`, with the facts a hallucination may
/// put in place of `fact`.
pub(super) struct Qa {
    pub category: &'static str,
    pub question: String,
    prefix: String,
    fact: String,
    suffix: String,
    /// Every wrong fact of the same kind.
    wrong: Vec<String>,
    /// Wrong facts that are present elsewhere in the image (a wrong colour that another object
    /// has, a neighbouring count) — the likelier hallucinations.
    plausible: Vec<String>,
}

impl Qa {
    pub fn answer(&self) -> String {
        self.with_fact(&self.fact)
    }

    /// The answer with the fact replaced by a wrong one: plausible ones half of the time.
    pub fn hallucinated(&self, rng: &mut WorldRng) -> String {
        let pool = if !self.plausible.is_empty() && rng.coin() { &self.plausible } else { &self.wrong };
        let fact: &String = rng.choose(pool);
        self.with_fact(fact)
    }

    fn with_fact(&self, fact: &str) -> String {
        format!("{} {} {}", self.prefix, fact, self.suffix)
    }
}

fn others<T: Copy + PartialEq>(all: &[T], except: T, name: impl Fn(T) -> &'static str) -> Vec<String> {
    all.iter().copied().filter(|&x| x != except).map(|x| name(x).to_string()).collect()
}

fn reference(object: &SceneObject) -> String {
    format!("the {} {}", object.colour.name(), object.shape.name())
}

/// (a, b, horizontal?) for every ordered pair of objects clearly apart along that axis.
fn position_facts(scene: &Scene) -> Vec<(usize, usize, bool)> {
    let gap = 0.2 * scene.image_size as f64;
    let mut facts = Vec::new();
    for (a, oa) in scene.objects.iter().enumerate() {
        for (b, ob) in scene.objects.iter().enumerate() {
            if a == b {
                continue;
            }
            if (oa.cx - ob.cx).abs() >= gap {
                facts.push((a, b, true));
            }
            if (oa.cy - ob.cy).abs() >= gap {
                facts.push((a, b, false));
            }
        }
    }
    facts
}

pub(super) fn question(scene: &Scene, rng: &mut WorldRng) -> Qa {
    let positions = position_facts(scene);
    let mut category = rng.below(5);
    if category == 3 && positions.is_empty() {
        category = [0, 1, 2, 4][rng.below(4)];
    }
    let objects = &scene.objects;
    let target = &objects[rng.below(objects.len())];
    let scene_colours = |except: Colour| -> Vec<String> {
        objects.iter().map(|o| o.colour).filter(|&c| c != except).map(|c| c.name().to_string()).collect()
    };
    match category {
        0 => {
            let shape = target.shape.name();
            let question = if rng.coin() {
                format!("What colour is the {shape} ?")
            } else {
                format!("What is the colour of the {shape} ?")
            };
            Qa {
                category: "colour",
                question,
                prefix: format!("The {shape} is"),
                fact: target.colour.name().into(),
                suffix: ".".into(),
                wrong: others(&Colour::ALL, target.colour, Colour::name),
                plausible: scene_colours(target.colour),
            }
        }
        1 => {
            let colour = target.colour.name();
            let question = if rng.coin() {
                format!("What shape is the {colour} object ?")
            } else {
                format!("Which shape is {colour} ?")
            };
            Qa {
                category: "shape",
                question,
                prefix: format!("The {colour} shape is a"),
                fact: target.shape.name().into(),
                suffix: ".".into(),
                wrong: others(&Shape::ALL, target.shape, Shape::name),
                plausible: objects
                    .iter()
                    .map(|o| o.shape)
                    .filter(|&s| s != target.shape)
                    .map(|s| s.name().to_string())
                    .collect(),
            }
        }
        2 => {
            let (question, subject, count, range) = if rng.coin() {
                let question = if rng.coin() { "How many shapes are in the image ?" } else { "How many shapes can you see ?" };
                (question, "shapes", objects.len(), 1..=5)
            } else {
                let small = objects.iter().filter(|o| o.size == Size::Small).count();
                ("How many small shapes are there ?", "small shapes", small, 0..=4)
            };
            let wrong: Vec<usize> = range.clone().filter(|&k| k != count).collect();
            let plausible = wrong.iter().copied().filter(|&k| k + 1 == count || k == count + 1).collect::<Vec<_>>();
            Qa {
                category: "count",
                question: question.to_string(),
                prefix: format!("The number of {subject} is"),
                fact: NUMBERS[count].into(),
                suffix: ".".into(),
                wrong: wrong.iter().map(|&k| NUMBERS[k].to_string()).collect(),
                plausible: plausible.iter().map(|&k| NUMBERS[k].to_string()).collect(),
            }
        }
        3 => {
            let (a, b, horizontal) = positions[rng.below(positions.len())];
            let (oa, ob) = (&objects[a], &objects[b]);
            let both_axes = positions.iter().filter(|&&(x, y, _)| x == a && y == b).count() == 2;
            let (ra, rb) = (reference(oa), reference(ob));
            let specific = both_axes || rng.coin();
            let question = match (specific, horizontal) {
                (true, true) => format!("Is {ra} to the left or to the right of {rb} ?"),
                (true, false) => format!("Is {ra} above or below {rb} ?"),
                (false, _) => format!("Where is {ra} relative to {rb} ?"),
            };
            let capital = format!("The{}", &ra[3..]);
            let (prefix, fact, suffix, wrong) = if horizontal {
                let (fact, wrong) = if oa.cx < ob.cx { ("left", "right") } else { ("right", "left") };
                (format!("{capital} is to the"), fact, format!("of {rb} ."), wrong)
            } else {
                let (fact, wrong) = if oa.cy < ob.cy { ("above", "below") } else { ("below", "above") };
                (format!("{capital} is"), fact, format!("{rb} ."), wrong)
            };
            Qa {
                category: "position",
                question,
                prefix,
                fact: fact.into(),
                suffix,
                wrong: vec![wrong.into()],
                plausible: Vec::new(),
            }
        }
        _ => {
            let r = reference(target);
            let question = if rng.coin() { format!("Is {r} large or small ?") } else { format!("What size is {r} ?") };
            let other = if target.size == Size::Large { Size::Small } else { Size::Large };
            Qa {
                category: "size",
                question,
                prefix: format!("The{} is", &r[3..]),
                fact: target.size.name().into(),
                suffix: ".".into(),
                wrong: vec![other.name().into()],
                plausible: Vec::new(),
            }
        }
    }
}

fn phrase(object: &SceneObject) -> String {
    format!("a {} {} {}", object.size.name(), object.colour.name(), object.shape.name())
}

fn join(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(" , ")),
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// A short caption in one of three templates, objects in random order after the large one.
pub(super) fn caption(scene: &Scene, rng: &mut WorldRng) -> String {
    let mut small: Vec<&SceneObject> = scene.objects[1..].iter().collect();
    rng.shuffle(&mut small);
    let items: Vec<String> = std::iter::once(scene.main_object()).chain(small).map(phrase).collect();
    let list = join(&items);
    let texture = scene.background.texture.adjective();
    match rng.below(3) {
        0 => format!("A picture of {list} on a {texture} background ."),
        1 => format!("This image shows {list} ."),
        _ => format!("{} on a {texture} background .", capitalise(&list)),
    }
}

/// Where an object's centre lies in a 3 × 3 grid over the image.
fn region(object: &SceneObject, image_size: u32) -> (usize, usize, &'static str) {
    let third = |v: f64| ((3.0 * v / image_size as f64) as usize).min(2);
    let (col, row) = (third(object.cx), third(object.cy));
    let words = [
        ["in the top left corner", "at the top", "in the top right corner"],
        ["on the left", "in the center", "on the right"],
        ["in the bottom left corner", "at the bottom", "in the bottom right corner"],
    ];
    (row, col, words[row][col])
}

/// A complete description in reading order (top to bottom, left to right).
pub(super) fn description(scene: &Scene) -> String {
    let mut placed: Vec<(usize, usize, String)> = scene
        .objects
        .iter()
        .map(|o| {
            let (row, col, place) = region(o, scene.image_size);
            (row, col, format!("{} {place}", phrase(o)))
        })
        .collect();
    placed.sort_by_key(|(row, col, _)| (*row, *col));
    let items: Vec<String> = placed.into_iter().map(|(_, _, text)| text).collect();
    format!("{} . The background is {} .", capitalise(&join(&items)), scene.background.texture.adjective())
}
