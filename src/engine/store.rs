//! The flat parameter store on a device: the tensors of a [`ParamLayout`] (every tensor of the
//! model as one span of a single flat buffer, under its checkpoint name) as views, and the
//! moves between host tensors in checkpoint order and the flat buffers. Weights, gradients and
//! both AdamW moments are each one such buffer, so zeroing, the global norm, clipping and AdamW
//! are one launch over the whole model (llm.c's layout), while checkpoints still see Hugging
//! Face names and shapes.

use crate::config::ModelConfig;
use crate::memory_plan::layout::ParamLayout;
use crate::model::params::Params;
use crate::ops::cuda::device::View;
use crate::ops::cuda::pool::Tensor;
use anyhow::Result;

/// The model's tensors as views into `flat` (laid out as `layout`).
pub fn params(layout: &ParamLayout, cfg: &ModelConfig, flat: View<f32>) -> Result<Params<Tensor>> {
    let mut spans = layout.spans.iter();
    Params::build(cfg, |_, _| {
        let span = spans.next().expect("one span per tensor");
        Ok(Tensor::borrowed(flat.slice(span.offset, span.len)?))
    })
}

/// Host tensors (in checkpoint order) as one flat vector, the padding zero.
pub fn flatten(layout: &ParamLayout, tensors: &[&Vec<f32>]) -> Vec<f32> {
    let mut flat = vec![0.0; layout.elements];
    for (span, t) in layout.spans.iter().zip(tensors) {
        flat[span.offset..span.offset + span.len].copy_from_slice(t);
    }
    flat
}

/// A flat vector cut back into its tensors, in checkpoint order.
pub fn split(layout: &ParamLayout, flat: &[f32]) -> Vec<Vec<f32>> {
    layout
        .spans
        .iter()
        .map(|s| flat[s.offset..s.offset + s.len].to_vec())
        .collect()
}
