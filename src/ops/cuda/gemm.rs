//! The device layer's matrix product, `c = alpha · op(a) · op(b) + beta · c` in row-major
//! terms, with every transpose the model needs (docs/cuda.md: cuBLAS for the large GEMMs):
//!
//! - forward `y = x · Wᵀ`: `a = x` as stored, `b = W` transposed;
//! - input gradient `dx = dy · W`: both as stored;
//! - weight gradient `dW += dyᵀ · x`: `a = dy` transposed, `beta = 1`.
//!
//! Inputs and output are bf16 -> bf16, bf16 -> f32 or f32 -> f32 (what `cublasGemmEx` takes
//! with `CUBLAS_COMPUTE_32F`), accumulation fp32 on a GPU. The emulator's product has the same contract with a wider
//! (f64) accumulation, which is inside every bound an fp32 accumulation must meet.

use super::device::Float;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// cuBLAS's workspace, handed to it once (`cublasSetWorkspace`) so that GEMMs allocate
/// nothing: NVIDIA recommends 32 MiB on Hopper (4 MiB before it); one size for every
/// architecture. The memory plan counts it.
pub const CUBLAS_WORKSPACE_BYTES: u64 = 32 << 20;

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// `c [m, n] = alpha · op(a) [m, k] · op(b) [k, n] + beta · c`, all row-major: `a` is stored
/// `[m, k]` (`Op::N`) or `[k, m]` (`Op::T`), `b` is stored `[k, n]` or `[n, k]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub op_a: Op,
    pub op_b: Op,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `y [m, n] = x [m, k] · w [n, k]ᵀ`: a projection by a checkpoint-layout weight.
    pub fn projection(m: usize, k: usize, n: usize) -> Gemm {
        Gemm {
            op_a: Op::N,
            op_b: Op::T,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `dx [m, k] = dy [m, n] · w [n, k]`: the input gradient of [`Gemm::projection`].
    pub fn projection_input_grad(m: usize, k: usize, n: usize) -> Gemm {
        Gemm {
            op_a: Op::N,
            op_b: Op::N,
            m,
            n: k,
            k: n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `dw [n, k] += dy [m, n]ᵀ · x [m, k]`: the weight gradient of [`Gemm::projection`],
    /// accumulated.
    pub fn projection_weight_grad(m: usize, k: usize, n: usize) -> Gemm {
        Gemm {
            op_a: Op::T,
            op_b: Op::N,
            m: n,
            n: k,
            k: m,
            alpha: 1.0,
            beta: 1.0,
        }
    }

    /// Leading dimensions (row lengths as stored) of `a`, `b` and `c`.
    pub fn leading_dims(&self) -> (usize, usize, usize) {
        let lda = match self.op_a {
            Op::N => self.k,
            Op::T => self.m,
        };
        let ldb = match self.op_b {
            Op::N => self.n,
            Op::T => self.k,
        };
        (lda, ldb, self.n)
    }

    /// Checks the operands' lengths and that every dimension fits cuBLAS's `int`.
    pub fn check(&self, a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
        let Gemm { m, n, k, .. } = *self;
        for (name, dim) in [("m", m), ("n", n), ("k", k)] {
            ensure!(
                dim <= i32::MAX as usize,
                "gemm: {name} = {dim} exceeds a 32-bit int"
            );
        }
        for (name, len, want) in [
            ("a", a_len, m * k),
            ("b", b_len, k * n),
            ("c", c_len, m * n),
        ] {
            ensure!(
                len == want,
                "gemm {:?}{:?} of m={m} n={n} k={k}: operand {name} has {len} elements, \
                 needs {want}",
                self.op_a,
                self.op_b
            );
        }
        Ok(())
    }
}

/// Element `(row, col)` of `op(x)` for `x` stored with rows of `ld`.
pub fn element(x: &[f32], op: Op, ld: usize, row: usize, col: usize) -> f32 {
    match op {
        Op::N => x[row * ld + col],
        Op::T => x[col * ld + row],
    }
}

/// The emulator's GEMM: the inputs as f32, each output's dot product accumulated in f64, then
/// `alpha · acc + beta · c` rounded once to the output type.
pub fn host_gemm<E: Float, C: Float>(g: &Gemm, a: &[E], b: &[E], c: &mut [C]) -> Result<()> {
    g.check(a.len(), b.len(), c.len())?;
    let (lda, ldb, _) = g.leading_dims();
    let a: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
    let b: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    // Rows of op(a) and columns of op(b), contiguous, so that each output is one dot product.
    let a_rows: Vec<f32> = (0..g.m)
        .flat_map(|i| (0..g.k).map(move |p| (i, p)))
        .map(|(i, p)| element(&a, g.op_a, lda, i, p))
        .collect();
    let b_cols: Vec<f32> = (0..g.n)
        .flat_map(|j| (0..g.k).map(move |p| (j, p)))
        .map(|(j, p)| element(&b, g.op_b, ldb, p, j))
        .collect();
    let (alpha, beta) = (g.alpha as f64, g.beta as f64);
    c.par_chunks_mut(g.n.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let a_row = &a_rows[i * g.k..(i + 1) * g.k];
            for (j, out) in row.iter_mut().enumerate() {
                let acc = crate::ops::cpu::linalg::dot(a_row, &b_cols[j * g.k..(j + 1) * g.k]);
                // beta = 0 ignores c, NaN included, as BLAS does.
                let prior = if beta == 0.0 {
                    0.0
                } else {
                    beta * out.to_f32() as f64
                };
                *out = C::from_f32((alpha * acc + prior) as f32);
            }
        });
    Ok(())
}
