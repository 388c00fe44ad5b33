//! The element type a backend stores a tensor in, and the one bf16 rounding rule that the
//! device's casts and the CPU's bf16-rounding mode share (docs/numerics.md §2).

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
            for v in values {
                *v = self.round(*v);
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}
