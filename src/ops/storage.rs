//! The element type a backend stores a tensor in, and the one bf16 rounding rule that the
//! device's casts and the CPU's bf16-rounding mode share (docs/numerics.md §2).

use rayon::prelude::*;

/// Elements per task when a whole tensor is rounded or converted on several threads: large
/// enough that a small tensor stays on one.
pub const PARALLEL_CHUNK: usize = 1 << 18;

/// What a tensor is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    /// `x` as this type stores it: bf16 rounds to nearest even (`cuda/cast.cu` does the same),
    /// f32 keeps it.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// Every element of `values` rounded as [`Dtype::round`] does.
    pub fn round_all(self, values: &mut [f32]) {
        if self == Dtype::Bf16 {
            // Element by element, so threads change nothing but the time (a 7B model's
            // weights are 7e9 of them).
            values
                .par_chunks_mut(PARALLEL_CHUNK)
                .for_each(|chunk| chunk.iter_mut().for_each(|v| *v = self.round(*v)));
        }
    }

    /// The first element of `values` that this type cannot hold: one that rounds to an
    /// infinity (bf16 has f32's exponent range but its largest value, 3.3895314e38, sits below
    /// f32's, so the last half-step of f32's range overflows).
    pub fn first_overflow(self, values: &[f32]) -> Option<(usize, f32)> {
        if self == Dtype::F32 {
            return None;
        }
        values
            .iter()
            .enumerate()
            .find(|(_, v)| v.is_finite() && !self.round(**v).is_finite())
            .map(|(i, v)| (i, *v))
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// splitmix64's finalizer, as `cuda/adamw.cu`'s `mix64`.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Which flat store a stochastic rounding draws for: each has its own 16 bits of an
/// element's random bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Weights = 0,
    ExpAvg = 1,
    ExpAvgSq = 2,
}

impl Store {
    /// This store's 16 bits of an element's [`rounding_bits`]: the weights the top 16, `m` the
    /// next, `v` the next (`cuda/adamw.cu`'s `store_draw`).
    pub fn draw(self, bits: u64) -> u32 {
        (bits >> (48 - 16 * self as u32)) as u32 & 0xffff
    }
}

/// The random bits of flat element `index` in AdamW step `step` of a run seeded `seed`
/// (docs/numerics.md §4), one hash an element that its stores share ([`Store::draw`]): the
/// device's hash, bit for bit.
pub fn rounding_bits(seed: u64, step: u64, index: u64) -> u64 {
    mix64(mix64(mix64(seed) ^ step) ^ index)
}

/// `x` rounded to one of its bf16 neighbours, up with probability equal to its distance from
/// the lower one over their gap, `draw` (16 uniform bits) deciding: `cuda/adamw.cu`'s
/// `bf16_stochastic`. Infinities and NaN round to nearest.
pub fn bf16_stochastic(x: f32, draw: u32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7f80_0000 == 0x7f80_0000 {
        return Dtype::Bf16.round(x);
    }
    let rounded = bits.wrapping_add(draw);
    f32::from_bits(rounded & 0xffff_0000)
}
