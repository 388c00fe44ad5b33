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

/// A Markdown table's header: `columns` (each a title and its alignment, `:--` or `--:`), a
/// column of modeled time per GPU titled `{gpu} {time}`, then `last`.
pub fn table_header(
    columns: &[(&str, &str)],
    gpus: &[Gpu],
    time: &str,
    last: (&str, &str),
) -> String {
    let titles = columns
        .iter()
        .map(|c| c.0.to_string())
        .chain(gpus.iter().map(|g| format!("{} {time}", g.name)))
        .chain([last.0.to_string()]);
    let aligns = columns
        .iter()
        .map(|c| c.1)
        .chain(gpus.iter().map(|_| "--:"))
        .chain([last.1]);
    let row = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    row(titles.collect()) + &row(aligns.map(str::to_string).collect())
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
