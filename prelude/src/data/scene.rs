//! The layout of a `ShapesWorld` image: shapes, colours, sizes, textures and the objects and
//! background of a scene — the vocabulary that rendering, the texts and the world share.
//!
//! It sits below every other module of the world (it imports none of them), so the renderer,
//! the text templates and the world can all use it without importing one another in a circle.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Cross,
    Diamond,
    Square,
    Star,
    Triangle,
}

impl Shape {
    /// Alphabetical, so that class folder names sort in label order.
    pub const ALL: [Shape; 6] = [Shape::Circle, Shape::Cross, Shape::Diamond, Shape::Square, Shape::Star, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Cross => "cross",
            Shape::Diamond => "diamond",
            Shape::Square => "square",
            Shape::Star => "star",
            Shape::Triangle => "triangle",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Value of this shape's pixels in segmentation masks (0 is background).
    pub fn mask_value(self) -> u8 {
        self as u8 + 1
    }
}

/// Colour groups of the probe label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ColourGroup {
    Cool,
    Warm,
}

impl ColourGroup {
    pub const ALL: [ColourGroup; 2] = [ColourGroup::Cool, ColourGroup::Warm];

    pub fn name(self) -> &'static str {
        match self {
            ColourGroup::Cool => "cool",
            ColourGroup::Warm => "warm",
        }
    }

    pub fn colours(self) -> [Colour; 4] {
        match self {
            ColourGroup::Cool => [Colour::Blue, Colour::Cyan, Colour::Green, Colour::Purple],
            ColourGroup::Warm => [Colour::Brown, Colour::Pink, Colour::Red, Colour::Yellow],
        }
    }
}

/// Object colours: all saturated (channel spread ≥ 100), none starting with a vowel so that
/// "a <colour> <shape>" never needs "an" and a hallucinated colour changes exactly one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Blue,
    Brown,
    Cyan,
    Green,
    Pink,
    Purple,
    Red,
    Yellow,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Blue,
        Colour::Brown,
        Colour::Cyan,
        Colour::Green,
        Colour::Pink,
        Colour::Purple,
        Colour::Red,
        Colour::Yellow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Brown => "brown",
            Colour::Cyan => "cyan",
            Colour::Green => "green",
            Colour::Pink => "pink",
            Colour::Purple => "purple",
            Colour::Red => "red",
            Colour::Yellow => "yellow",
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Blue => [40, 80, 225],
            Colour::Brown => [145, 90, 35],
            Colour::Cyan => [35, 200, 215],
            Colour::Green => [40, 175, 55],
            Colour::Pink => [245, 125, 195],
            Colour::Purple => [140, 55, 195],
            Colour::Red => [220, 35, 35],
            Colour::Yellow => [235, 210, 35],
        }
    }

    pub fn group(self) -> ColourGroup {
        if ColourGroup::Warm.colours().contains(&self) { ColourGroup::Warm } else { ColourGroup::Cool }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Texture {
    Noise,
    Stripes,
    Checker,
}

impl Texture {
    pub const ALL: [Texture; 3] = [Texture::Noise, Texture::Stripes, Texture::Checker];

    /// The adjective captions use.
    pub fn adjective(self) -> &'static str {
        match self {
            Texture::Noise => "noisy",
            Texture::Stripes => "striped",
            Texture::Checker => "checkered",
        }
    }
}

/// Pixel box `[x0, x1) × [y0, y1)` of an object's visible pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundingBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SceneObject {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// Centre in pixels (x right, y down).
    pub cx: f64,
    pub cy: f64,
    /// Half-extent in pixels.
    pub radius: f64,
    /// Tight box of the visible pixels.
    pub bbox: BoundingBox,
    pub visible_pixels: usize,
    /// Share of the object's own pixels that no later object covers.
    pub visible_fraction: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Background {
    pub texture: Texture,
    /// Desaturated base colour.
    pub base: [u8; 3],
    /// Luminance offset of the texture pattern.
    pub amplitude: i32,
    /// Stripe period, checker cell or noise cell, in pixels.
    pub period: u32,
    /// Stripe direction: 0 horizontal, 1 vertical, 2 and 3 diagonal.
    pub orientation: u8,
}

/// The layout of one image: everything the texts and labels are computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub image_size: u32,
    /// Objects; index 0 is the large object that defines the class.
    pub objects: Vec<SceneObject>,
    /// Indices into `objects`, back to front.
    pub draw_order: Vec<usize>,
    pub background: Background,
    /// Probe label, an index into `ShapesWorld::class_names()`.
    pub class: usize,
}

impl Scene {
    pub(super) fn geometry(&self) -> Vec<(Shape, f64, f64, f64)> {
        self.objects.iter().map(|o| (o.shape, o.cx, o.cy, o.radius)).collect()
    }

    /// The large object the class label is about.
    pub fn main_object(&self) -> &SceneObject {
        &self.objects[0]
    }
}
