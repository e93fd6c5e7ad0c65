//! The world's portable random numbers: one ChaCha8 stream per (seed, split, index, purpose).
//!
//! The ChaCha stream is specified and every draw below uses only integer arithmetic and exact
//! IEEE operations, so a seed gives the same samples on every machine.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Split;

/// Independent random streams of one sample: the scene of sample i never depends on whether its
/// question or its hallucination was drawn.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stream {
    Scene = 1,
    ClassBlock = 2,
    Question = 3,
    Hallucination = 4,
    Caption = 5,
    Texture = 6,
    /// The counterfactual preference pairs' choices (category, target, the other object).
    Pair = 7,
}

/// The world-wide part of a stream's key: the seed and the study part (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WorldSeed {
    pub seed: u64,
    pub part: u8,
}

pub(super) struct WorldRng(ChaCha8Rng);

impl WorldRng {
    /// A stream keyed by (world seed and study part, split, index, purpose): sample i is the
    /// same however many samples were drawn before it. Part 0 (no study part) leaves the key as
    /// it was before parts existed, so the world's own samples keep their bytes.
    pub fn new(seed: WorldSeed, split: Split, index: u64, stream: Stream) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.seed.to_le_bytes());
        key[8..16].copy_from_slice(&index.to_le_bytes());
        key[16] = split as u8;
        key[17] = stream as u8;
        key[18] = seed.part;
        key[24..].copy_from_slice(b"shapes-w");
        WorldRng(ChaCha8Rng::from_seed(key))
    }

    /// Uniform in `0..n` (n > 0). The modulo bias is below 2^-50 for our n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    pub fn int_range(&mut self, lo: i32, hi_inclusive: i32) -> i32 {
        lo + self.below((hi_inclusive - lo + 1) as usize) as i32
    }

    pub fn coin(&mut self) -> bool {
        self.0.next_u64() & 1 == 1
    }

    pub fn choose<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}
