//! The flat parameter store: every tensor of a model as one span of a single flat buffer,
//! under its checkpoint name, in checkpoint order. Weights, gradients and both AdamW moments
//! are each one such buffer, so zeroing, the global norm, clipping and AdamW are one launch
//! over the whole model (llm.c's layout), while checkpoints still see Hugging Face names and
//! shapes.

use crate::config::ModelConfig;
use crate::model::params::{param_specs, Params};
use crate::ops::cuda::device::View;
use crate::ops::cuda::pool::Tensor;
use anyhow::Result;

/// A tensor's place in the flat buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub name: String,
    pub shape: Vec<usize>,
    /// First element.
    pub offset: usize,
    pub len: usize,
}

/// Where each parameter lives in a flat buffer of [`ParamStore::total`] elements.
#[derive(Clone, Debug)]
pub struct ParamStore {
    pub spans: Vec<Span>,
    pub total: usize,
}

impl ParamStore {
    /// The tensors of `cfg` back to back, in `param_specs` order (each span starts on a
    /// multiple of 64 elements, so that every tensor keeps 256-byte alignment in f32 and
    /// 128-byte in bf16, for vector loads).
    pub fn new(cfg: &ModelConfig) -> ParamStore {
        let mut spans = Vec::new();
        let mut offset = 0;
        for (name, shape) in param_specs(cfg) {
            let len = shape.iter().product();
            spans.push(Span {
                name,
                shape,
                offset,
                len,
            });
            offset = (offset + len).next_multiple_of(64);
        }
        ParamStore {
            spans,
            total: offset,
        }
    }

    /// The model's tensors as views into `flat`.
    pub fn params(&self, cfg: &ModelConfig, flat: View<f32>) -> Result<Params<Tensor>> {
        let mut spans = self.spans.iter();
        Params::build(cfg, |_, _| {
            let span = spans.next().expect("one span per tensor");
            Ok(Tensor::borrowed(flat.slice(span.offset, span.len)?))
        })
    }

    /// Host tensors (in checkpoint order) as one flat vector, the gaps zero.
    pub fn flatten(&self, tensors: &[&Vec<f32>]) -> Vec<f32> {
        let mut flat = vec![0.0; self.total];
        for (span, t) in self.spans.iter().zip(tensors) {
            flat[span.offset..span.offset + span.len].copy_from_slice(t);
        }
        flat
    }

    /// A flat vector cut back into its tensors, in checkpoint order.
    pub fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.spans
            .iter()
            .map(|s| flat[s.offset..s.offset + s.len].to_vec())
            .collect()
    }
}
