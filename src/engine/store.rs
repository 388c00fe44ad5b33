//! The flat parameter store on a device: the tensors of a [`ParamLayout`] (every tensor of the
//! model as one span of a single flat buffer, under its checkpoint name) as views, and the
//! moves between host tensors in checkpoint order and the flat buffers. Weights, gradients and
//! both AdamW moments are each one such buffer, f32 or bf16 (docs/numerics.md §7), so the
//! global norm, clipping and AdamW are one launch over the whole model (llm.c's layout),
//! while checkpoints still see Hugging Face names and shapes.

use crate::config::ModelConfig;
use crate::memory_plan::layout::{ParamLayout, ParamSpan};
use crate::model::params::Params;
use crate::ops::cuda::device::{Arena, Device};
use crate::ops::cuda::pool::{Tensor, TensorView};
use crate::ops::storage::Dtype;
use anyhow::{ensure, Context, Result};

/// A flat store of `elements` of `dtype`, the next region of `arena`, under `name`.
pub fn carve(arena: &mut Arena, name: &str, elements: usize, dtype: Dtype) -> Result<TensorView> {
    Ok(match dtype {
        Dtype::F32 => TensorView::F32(arena.carve(name, elements)?),
        Dtype::Bf16 => TensorView::Bf16(arena.carve(name, elements)?),
    })
}

/// The model's tensors as views into `flat` (laid out as `layout`).
pub fn params(layout: &ParamLayout, cfg: &ModelConfig, flat: TensorView) -> Result<Params<Tensor>> {
    let mut spans = layout.spans.iter();
    Params::build(cfg, |_, _| {
        let span = spans.next().expect("one span per tensor");
        Ok(Tensor::borrowed(flat.slice(span.offset, span.len)?))
    })
}

/// Host tensors (in checkpoint order) into the flat store `flat`, tensor by tensor and
/// rounded to its type: no flat host copy of the model (29 GB in f32 for a 7B), and the
/// padding between spans left as it is (zero in a fresh arena).
pub fn upload(
    device: &Device,
    layout: &ParamLayout,
    flat: TensorView,
    tensors: &[&Vec<f32>],
) -> Result<()> {
    ensure!(
        tensors.len() == layout.spans.len(),
        "{} tensors for a store of {}",
        tensors.len(),
        layout.spans.len()
    );
    for (i, t) in tensors.iter().enumerate() {
        upload_one(device, layout, flat, i, t)?;
    }
    Ok(())
}

/// Tensor `index` (in checkpoint order) of the flat store `flat`, replaced by `values`
/// rounded to the store's type.
pub fn upload_one(
    device: &Device,
    layout: &ParamLayout,
    flat: TensorView,
    index: usize,
    values: &[f32],
) -> Result<()> {
    let span = span(layout, index)?;
    ensure!(
        values.len() == span.len,
        "a tensor of {} elements for a span of {}",
        values.len(),
        span.len
    );
    flat.slice(span.offset, span.len)?.upload(device, values)
}

/// The span of tensor `index` (in checkpoint order).
fn span(layout: &ParamLayout, index: usize) -> Result<&ParamSpan> {
    layout.spans.get(index).with_context(|| {
        format!(
            "tensor {index} of a store of {} tensors",
            layout.spans.len()
        )
    })
}

/// Tensor `index` (in checkpoint order) of the flat store `flat`, as f32.
pub fn download_one(
    device: &Device,
    layout: &ParamLayout,
    flat: TensorView,
    index: usize,
) -> Result<Vec<f32>> {
    let span = span(layout, index)?;
    flat.slice(span.offset, span.len)?.download(device)
}

/// The flat store `flat` as its tensors, in checkpoint order, downloaded one by one: the
/// host never holds the flat copy beside them (29 GB more in f32 for a 7B).
pub fn download(device: &Device, layout: &ParamLayout, flat: TensorView) -> Result<Vec<Vec<f32>>> {
    (0..layout.spans.len())
        .map(|i| download_one(device, layout, flat, i))
        .collect()
}
