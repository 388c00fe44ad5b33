//! The flat parameter store: every tensor of `param_specs` at an element offset, the same
//! offsets in the weights, the master copy, the gradients and both moments, so that
//! the global norm, clipping and AdamW are one launch over one buffer each
//! (docs/architecture.md §12).

use crate::config::ModelConfig;
use crate::model::params::param_specs;

/// Every tensor starts at a multiple of this many elements: 256 bytes in bf16 (512 in f32),
/// the alignment of a cudaMalloc'd buffer, so that a tensor's view is as aligned as its own
/// allocation would be. The padding between tensors is zero in every store and stays zero
/// under AdamW (zero gradient, zero moments, zero weight).
pub const PARAM_ALIGN_ELEMS: usize = 128;

/// One tensor's place in the flat store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpan {
    /// Its checkpoint name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    /// First element, a multiple of [`PARAM_ALIGN_ELEMS`].
    pub offset: usize,
    /// Its elements (the product of `shape`).
    pub len: usize,
}

/// The tensors of a model in `param_specs` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub spans: Vec<ParamSpan>,
    /// Elements of the store, padding included: one store's bytes are this times its dtype's.
    pub elements: usize,
    /// The model's parameter count (no padding).
    pub parameters: usize,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut offset = 0;
        let mut parameters = 0;
        let spans = param_specs(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let span = ParamSpan {
                    name,
                    shape,
                    offset,
                    len,
                };
                parameters += len;
                offset += len.div_ceil(PARAM_ALIGN_ELEMS) * PARAM_ALIGN_ELEMS;
                span
            })
            .collect();
        ParamLayout {
            spans,
            elements: offset,
            parameters,
        }
    }

    /// The span of the tensor named `name`.
    pub fn span(&self, name: &str) -> Option<&ParamSpan> {
        self.spans.iter().find(|s| s.name == name)
    }
}
