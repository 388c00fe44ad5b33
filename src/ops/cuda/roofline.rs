//! A roofline model of a launch on a GPU: modeled time = max(bytes / bandwidth, FLOPs / peak).
//! The figures are the published ones (DRAM bandwidth, dense bf16 tensor-core peak) unless a
//! measurement replaces them ([`Gpu::measured`], as the GPU suite's bench does with its copy
//! bandwidth). A model, not a measurement: it ignores latency, occupancy, caches beyond the
//! compulsory traffic, and launch overhead.

/// The two figures of a GPU that the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpu {
    pub name: String,
    /// DRAM bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Dense bf16 tensor-core peak, FLOP per second.
    pub bf16_flops: f64,
}

impl Gpu {
    /// A100 SXM4 80 GB: 2039 GB/s HBM2e, 312 TFLOP/s dense bf16 (NVIDIA's A100 datasheet).
    pub fn a100() -> Gpu {
        Gpu {
            name: "A100".into(),
            bandwidth: 2039e9,
            bf16_flops: 312e12,
        }
    }

    /// H100 SXM5 80 GB: 3350 GB/s HBM3, 989 TFLOP/s dense bf16 (NVIDIA's H100 datasheet).
    pub fn h100() -> Gpu {
        Gpu {
            name: "H100".into(),
            bandwidth: 3350e9,
            bf16_flops: 989e12,
        }
    }

    /// A GPU with measured figures (a copy's bandwidth, a GEMM's FLOP/s).
    pub fn measured(name: &str, bandwidth: f64, bf16_flops: f64) -> Gpu {
        Gpu {
            name: name.into(),
            bandwidth,
            bf16_flops,
        }
    }

    /// The modeled seconds of moving `bytes` and computing `flops`.
    pub fn seconds(&self, bytes: f64, flops: f64) -> f64 {
        (bytes / self.bandwidth).max(flops / self.bf16_flops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slower_roof_wins() {
        let gpu = Gpu::measured("test", 1e12, 100e12);
        assert_eq!(gpu.seconds(2e12, 1e12), 2.0);
        assert_eq!(gpu.seconds(1e9, 300e12), 3.0);
    }
}
