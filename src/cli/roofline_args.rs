//! `--bandwidth` and `--tflops`: the roofline model priced with measured figures.

use anyhow::{bail, Result};
use clap::Args;
use contralign::ops::cuda::roofline::Gpu;

/// The GPUs a modeled table prices with: the published A100 and H100, or with measured
/// figures (the GPU suite's copy bandwidth, a GEMM's rate) in place of the H100's.
#[derive(Args, Debug)]
pub struct RooflineArgs {
    /// Price the model at this measured DRAM bandwidth, GB/s (bytes read + written, as the GPU
    /// suite's device-to-device copy reports it), in place of the H100's published 3350; the
    /// column is then named `measured`.
    #[arg(long, value_name = "GB/s")]
    bandwidth: Option<f64>,
    /// Price the model at this measured bf16 peak, TFLOP/s (a large GEMM's rate), in place of
    /// the H100's published 989 (f32 ops, on the CUDA cores, at the H100's ratio of 67 to 989).
    #[arg(long, value_name = "TFLOP/s")]
    tflops: Option<f64>,
}

impl RooflineArgs {
    /// Whether a measured figure was given.
    pub fn given(&self) -> bool {
        self.bandwidth.is_some() || self.tflops.is_some()
    }

    pub fn gpus(&self) -> Result<Vec<Gpu>> {
        for (flag, value) in [("--bandwidth", self.bandwidth), ("--tflops", self.tflops)] {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                bail!("{flag} must be a finite number above 0, found {v}");
            }
        }
        Gpu::priced(
            self.bandwidth.map(|b| b * 1e9),
            self.tflops.map(|t| t * 1e12),
        )
    }
}
