//! A roofline model of a launch on a GPU: modeled time = max(bytes / bandwidth, FLOPs / peak).
//! The figures are the published ones (DRAM bandwidth, dense bf16 tensor-core peak) unless a
//! measurement replaces them ([`Gpu::measured`]: the GPU suite's kernel bench with its copy
//! bandwidth, `selftest --profile` and `bench step-model` with `--bandwidth` and `--tflops`).
//! A model, not a measurement: it ignores latency, occupancy and caches beyond the compulsory
//! traffic; launch overhead only in the step model's second figure ([`LAUNCH_FLOOR_S`]).

use anyhow::{ensure, Result};
use serde::Serialize;

/// The least time the step model's second figure lets a launch take: back-to-back launches
/// on one stream cost a few microseconds each on an A100 or H100 even when the kernel has
/// almost nothing to do (the launch's latency, the grid's ramp-up and drain). An assumed
/// round figure, not a measurement; CUDA graphs would lower it.
pub const LAUNCH_FLOOR_S: f64 = 3e-6;

/// The figures of a GPU that the model uses.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gpu {
    pub name: String,
    /// DRAM bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Dense bf16 tensor-core peak, FLOP per second.
    pub bf16_flops: f64,
    /// fp32 peak on the CUDA cores (no tensor cores: cuBLAS's `COMPUTE_32F` without TF32, and
    /// the f32 kernels' FMAs), FLOP per second.
    pub f32_flops: f64,
}

/// Which units an op's FLOPs run on, and so which peak prices them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Math {
    /// bf16 inputs on the tensor cores (cuBLAS, WMMA).
    Bf16TensorCores,
    /// fp32 on the CUDA cores: the f32 paths, which exist to check the engine, not for speed.
    F32,
}

impl Math {
    /// The units that ops storing `dtype` (`"f32"` or `"bf16"`, as `Float::DTYPE` and
    /// `Dtype::name` spell them) compute on.
    pub fn of(dtype: &str) -> Math {
        if dtype == "f32" {
            Math::F32
        } else {
            Math::Bf16TensorCores
        }
    }
}

impl Gpu {
    /// A100 SXM4 80 GB: 2039 GB/s HBM2e, 312 TFLOP/s dense bf16, 19.5 TFLOP/s fp32 (NVIDIA's
    /// A100 datasheet).
    pub fn a100() -> Gpu {
        Gpu {
            name: "A100".into(),
            bandwidth: 2039e9,
            bf16_flops: 312e12,
            f32_flops: 19.5e12,
        }
    }

    /// H100 SXM5 80 GB: 3350 GB/s HBM3, 989 TFLOP/s dense bf16, 67 TFLOP/s fp32 (NVIDIA's
    /// H100 datasheet).
    pub fn h100() -> Gpu {
        Gpu {
            name: "H100".into(),
            bandwidth: 3350e9,
            bf16_flops: 989e12,
            f32_flops: 67e12,
        }
    }

    /// H200 SXM 141 GB: 4800 GB/s HBM3e, 989 TFLOP/s dense bf16, 67 TFLOP/s fp32 (NVIDIA's
    /// H200 datasheet).
    pub fn h200() -> Gpu {
        Gpu {
            name: "H200".into(),
            bandwidth: 4800e9,
            bf16_flops: 989e12,
            f32_flops: 67e12,
        }
    }

    /// The published figures of the GPU a device description names: an A100's, an H200's, or
    /// else an H100's (the emulator's too, so that its bench runs print the field).
    pub fn published_for(description: &str) -> Gpu {
        if description.contains("A100") {
            Gpu::a100()
        } else if description.contains("H200") {
            Gpu::h200()
        } else {
            Gpu::h100()
        }
    }

    /// A GPU with measured figures (a copy's bandwidth, a bf16 GEMM's FLOP/s). Its fp32 peak
    /// is not measured: it is taken as the same fraction of the bf16 one as on an H100.
    pub fn measured(name: &str, bandwidth: f64, bf16_flops: f64) -> Gpu {
        let h100 = Gpu::h100();
        Gpu {
            name: name.into(),
            bandwidth,
            bf16_flops,
            f32_flops: bf16_flops * h100.f32_flops / h100.bf16_flops,
        }
    }

    /// The GPUs a modeled table prices with: the published A100 and H100, the H100's figures
    /// replaced by measured ones where given (bytes per second, FLOP per second), then named
    /// `measured`.
    pub fn priced(bandwidth: Option<f64>, bf16_flops: Option<f64>) -> Result<Vec<Gpu>> {
        for (what, value) in [("bandwidth", bandwidth), ("bf16 peak", bf16_flops)] {
            if let Some(v) = value {
                ensure!(
                    v.is_finite() && v > 0.0,
                    "a measured {what} must be a finite number above 0, got {v}"
                );
            }
        }
        let h100 = Gpu::h100();
        let last = match (bandwidth, bf16_flops) {
            (None, None) => h100,
            _ => Gpu::measured(
                "measured",
                bandwidth.unwrap_or(h100.bandwidth),
                bf16_flops.unwrap_or(h100.bf16_flops),
            ),
        };
        Ok(vec![Gpu::a100(), last])
    }

    /// `NAME (B GB/s, P TFLOP/s)`, for a table's caption.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:.0} GB/s, {:.0} TFLOP/s)",
            self.name,
            self.bandwidth / 1e9,
            self.bf16_flops / 1e12
        )
    }

    /// The modeled seconds of moving `bytes` and computing `flops` on the tensor cores.
    pub fn seconds(&self, bytes: f64, flops: f64) -> f64 {
        self.seconds_on(bytes, flops, Math::Bf16TensorCores)
    }

    /// The modeled seconds of moving `bytes` and computing `flops` on `math`'s units.
    pub fn seconds_on(&self, bytes: f64, flops: f64, math: Math) -> f64 {
        let peak = match math {
            Math::Bf16TensorCores => self.bf16_flops,
            Math::F32 => self.f32_flops,
        };
        (bytes / self.bandwidth).max(flops / peak)
    }
}

/// The roofline model's time of one timed part of a bench (`bench attention`, `moe`,
/// `scoring`), for its JSON beside the measured time: the part's ideal bytes (each input read
/// once, each output written once) and analytic FLOPs on the published figures of the GPU it
/// ran on ([`Gpu::published_for`]), so that the model can be checked against a GPU.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Modeled {
    pub gpu: Gpu,
    pub bytes: f64,
    pub flops: f64,
    pub math: Math,
    pub ms: f64,
}

impl Modeled {
    pub fn new(gpu: &Gpu, bytes: f64, flops: f64, math: Math) -> Modeled {
        Modeled {
            gpu: gpu.clone(),
            bytes,
            flops,
            math,
            ms: gpu.seconds_on(bytes, flops, math) * 1e3,
        }
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
        assert_eq!(
            Modeled::new(&gpu, 2e12, 1e12, Math::Bf16TensorCores).ms,
            2000.0
        );
        let h100 = Gpu::h100();
        assert_eq!(h100.seconds_on(1e9, 67e12, Math::F32), 1.0);
        assert_eq!(h100.seconds_on(1e9, 989e12, Math::Bf16TensorCores), 1.0);
    }

    #[test]
    fn measured_figures_replace_the_h100s() {
        assert_eq!(Gpu::priced(None, None).unwrap(), [Gpu::a100(), Gpu::h100()]);
        let gpus = Gpu::priced(Some(2900e9), None).unwrap();
        assert_eq!(gpus[1], Gpu::measured("measured", 2900e9, 989e12));
        assert_eq!(gpus[1].describe(), "measured (2900 GB/s, 989 TFLOP/s)");
        let gpus = Gpu::priced(None, Some(700e12)).unwrap();
        assert_eq!(gpus[1].bandwidth, 3350e9);
        let error = Gpu::priced(Some(0.0), None).unwrap_err().to_string();
        assert!(
            error.contains("bandwidth must be a finite number above 0"),
            "{error}"
        );
        assert!(Gpu::priced(None, Some(f64::NAN)).is_err());
    }

    #[test]
    fn a_device_is_priced_as_the_gpu_it_names() {
        assert_eq!(Gpu::published_for("NVIDIA A100-SXM4-80GB"), Gpu::a100());
        assert_eq!(Gpu::published_for("NVIDIA H200"), Gpu::h200());
        assert_eq!(Gpu::published_for("NVIDIA H100 80GB HBM3"), Gpu::h100());
        assert_eq!(Gpu::published_for("CUDA emulator"), Gpu::h100());
    }
}
