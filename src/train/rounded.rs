//! Training on the CPU in its bf16-rounding mode (docs/numerics.md §7): the device engine's
//! step with bf16 stores, computed by the CPU reference and rounded exactly where the engine
//! rounds, so that `train --device emu` can be checked against it option by option.
//!
//! The policy's host weights hold what the engine's `weights()` returns: the fp32 master copy
//! when there is one (the bf16 weights are its round-to-nearest), else the bf16 weights. The
//! gradients are accumulated in their store's type by [`RoundedCpuOps`], and AdamW updates
//! each tensor as the device's kernel updates the flat store (`FlatStores`, the stochastic
//! roundings hashed from the tensor's flat index).

use super::optimizer::{AdamW, FlatStep, FlatStores};
use crate::memory_plan::layout::ParamLayout;
use crate::memory_plan::PrecisionOptions;
use crate::model::params::Params;
use crate::model::Model;
use crate::ops::cpu::{RoundedCpuOps, Stored};
use crate::ops::storage::Dtype;

/// The stores' types, and where each tensor sits in the flat store.
pub struct RoundedStores {
    pub precision: PrecisionOptions,
    layout: ParamLayout,
}

impl RoundedStores {
    /// For `policy`, whose weights it rounds to bf16 when there is no master copy (as the
    /// engine's upload does).
    pub fn new(precision: PrecisionOptions, policy: &mut Model<Vec<f32>>) -> Self {
        if precision.master_bytes() == 0 {
            for w in policy.params.iter_mut() {
                Dtype::from(precision.precision).round_all(w);
            }
        }
        RoundedStores {
            precision,
            layout: ParamLayout::new(&policy.cfg),
        }
    }

    fn storage(&self) -> Dtype {
        self.precision.precision.into()
    }

    pub fn ops(&self) -> RoundedCpuOps {
        RoundedCpuOps::new(self.storage())
    }

    /// The policy as the ops' tensors: its weights in the storage type.
    pub fn model(&self, policy: &Model<Vec<f32>>) -> Model<Stored> {
        let storage = self.storage();
        let mut weights = policy.params.iter().into_iter();
        let params = Params::build(&policy.cfg, |_, _| {
            let mut values = weights.next().expect("one weight per tensor").clone();
            storage.round_all(&mut values);
            Ok(Stored {
                values,
                dtype: storage,
            })
        })
        .expect("the policy's own shapes");
        Model {
            cfg: policy.cfg.clone(),
            params,
            dtype: policy.dtype,
        }
    }

    /// Zero gradients in the gradient store's type.
    pub fn zero_grads(&self, policy: &Model<Vec<f32>>) -> Params<Stored> {
        let dtype = self.precision.grads.into();
        Params::build(&policy.cfg, |_, shape| {
            Ok(Stored {
                values: vec![0.0; shape.iter().product()],
                dtype,
            })
        })
        .expect("the policy's own shapes")
    }

    /// The gradients' global norm (f64) and the clipping coefficient to `max_norm` (0: none)
    /// as the device's `grad_norm_{f32,bf16}` kernels compute it, in f32 from the norm.
    pub fn norm_and_coef(grads: &Params<Stored>, max_norm: f64) -> (f64, f64) {
        let values: Vec<&Vec<f32>> = grads.iter().into_iter().map(|g| &g.values).collect();
        let norm = super::optimizer::global_norm(&values);
        let coef = max_norm as f32 / (norm as f32 + 1e-6);
        let coef = if max_norm > 0.0 && coef < 1.0 {
            coef
        } else {
            1.0
        };
        (norm, coef as f64)
    }

    /// AdamW step `step` on every tensor, each gradient scaled by `coef` first.
    pub fn update(
        &self,
        policy: &mut Model<Vec<f32>>,
        optimizer: &mut AdamW,
        grads: &Params<Stored>,
        step: &FlatStep,
        coef: f64,
    ) {
        let storage = self.storage();
        let master = self.precision.master_bytes() > 0;
        let grads = grads.iter();
        for (i, weights) in policy.params.iter_mut().into_iter().enumerate() {
            let mut bf16_copy = weights.clone();
            storage.round_all(&mut bf16_copy);
            let (stored, master) = match master {
                true => (&mut bf16_copy[..], Some(&mut weights[..])),
                false => (&mut weights[..], None),
            };
            FlatStores {
                weights: (stored, storage),
                master,
                grads: &grads[i].values,
                moments: (
                    &mut optimizer.exp_avg[i],
                    &mut optimizer.exp_avg_sq[i],
                    self.precision.moments.into(),
                ),
                first: self.layout.spans[i].offset as u64,
            }
            .update(step, coef);
        }
    }
}
