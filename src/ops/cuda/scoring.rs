//! The fused LM-head scoring on a device (docs/architecture.md §8;
//! cuda/scoring.cu): per chunk of prediction rows, the logits `z = h · Wᵀ` by a GEMM (fp32
//! accumulation, stored as the model's element type), then one pass over each row for its
//! log-sum-exp and target log-prob; per response `S, n, A, E` by a segmented reduction; and in
//! the backward, the chunk's logits recomputed, `dL/dz` written over them in place, and the
//! two GEMMs `dh = dz · W` and `dW += dzᵀ · h`. Extra memory: one chunk of logits plus a few
//! values per row, whatever the batch.
//!
//! Per-row values are fp32 (the kernels' math); the per-response sums are fp64, reduced once
//! over all rows after the chunks (so a response that straddles chunks needs nothing special,
//! and the sum is in a fixed order: deterministic, no atomics).

use super::device::{AsView, Device, Float, View};
use super::emu::KernelArgs;
use super::fresh::GradWrite;
use super::gemm::Gemm;
use super::kernels::{rows_of, same_len, Kernels};
use super::lists::{ListSource, Uploads};
use super::pool::{Leased, Pool};
use crate::ops::ResponseSpan;
use anyhow::{ensure, Result};
use std::rc::Rc;

/// The logits one chunk may hold when nothing else says (the memory plan will): 256 MiB, a
/// chunk of 4096 rows of a 32,000-token vocabulary in bf16, large enough for the GEMMs to run
/// at full speed.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 20;

/// Rows per chunk for logits of `vocab` elements of `E` within `budget` bytes (at least one).
pub fn chunk_rows_for<E>(vocab: usize, budget: usize) -> usize {
    (budget / (vocab.max(1) * size_of::<E>())).max(1)
}

/// A batch's response spans on the device: `(start, len, has_eos)` per response, as
/// `scoring_response_stats` and `scoring_row_coef` read them.
pub struct Spans {
    table: Rc<Leased<i32>>,
    responses: usize,
    rows: usize,
    /// Whether the spans tile the rows (a packed batch's do): then `row_coef` writes every
    /// coefficient and nothing needs zeroing first.
    tiles_rows: bool,
}

impl Spans {
    /// The `(start, len, has_eos)` table of `spans` of a batch of `rows` prediction rows, as
    /// the kernels read it; every span must be non-empty and inside the rows.
    pub fn host_table(spans: &[ResponseSpan], rows: usize) -> Result<Vec<i32>> {
        ensure!(
            rows <= i32::MAX as usize,
            "scoring: {rows} prediction rows exceed a 32-bit int"
        );
        let mut table = Vec::with_capacity(3 * spans.len());
        for (i, s) in spans.iter().enumerate() {
            ensure!(
                s.len > 0 && s.first + s.len <= rows,
                "scoring: response {i} spans rows {}..{} of a batch of {rows}",
                s.first,
                s.first + s.len
            );
            table.extend([s.first as i32, s.len as i32, s.ends_with_eos as i32]);
        }
        Ok(table)
    }

    /// Uploads `spans` of a batch of `rows` prediction rows into `pool` ([`Spans::new`]).
    pub fn upload(
        device: &Device,
        pool: &Pool,
        spans: &[ResponseSpan],
        rows: usize,
    ) -> Result<Spans> {
        Spans::new(spans, rows, &Uploads { device, pool })
    }

    /// `spans` of a batch of `rows` prediction rows on the device, their table from `source`.
    pub fn new(spans: &[ResponseSpan], rows: usize, source: &impl ListSource) -> Result<Spans> {
        let table = Spans::host_table(spans, rows)?;
        let mut next = 0;
        let tiles_rows = spans.iter().all(|s| {
            let follows = s.first == next;
            next = s.first + s.len;
            follows
        }) && next == rows;
        Ok(Spans {
            table: source.list(&table)?,
            responses: spans.len(),
            rows,
            tiles_rows,
        })
    }

    /// `[responses, 3] = (start, len, has_eos)`, as the loss kernels read it too.
    pub fn table(&self) -> View<i32> {
        self.table.view()
    }

    pub fn responses(&self) -> usize {
        self.responses
    }
}

impl Kernels<'_> {
    /// `lse` and `logp` of rows `row0..row0 + rows` from the chunk `z` (its first `rows` rows
    /// of `vocab` logits) and `targets` (whole-batch buffers, as `lse` and `logp`).
    #[allow(clippy::too_many_arguments)]
    pub fn scoring_rows<E: Float>(
        &self,
        z: &impl AsView<E>,
        rows: usize,
        vocab: usize,
        targets: &impl AsView<u32>,
        row0: usize,
        lse: &mut impl AsView<f32>,
        logp: &mut impl AsView<f32>,
    ) -> Result<()> {
        let (z, targets, lse, logp) = (z.view(), targets.view(), lse.view(), logp.view());
        check_chunk("scoring_rows", z.len(), rows, vocab, targets.len(), row0)?;
        same_len("scoring_rows lse", targets, lse)?;
        same_len("scoring_rows logp", targets, logp)?;
        let mut args = KernelArgs::new();
        args.buffer(&z)
            .arg(rows as i32)
            .arg(vocab as i32)
            .buffer(&targets)
            .arg(row0 as i64)
            .buffer(&lse)
            .buffer(&logp);
        self.launch(&format!("scoring_rows_{}", E::DTYPE), rows, &args)
    }

    /// Overwrites the chunk `z` (rows `row0..row0 + rows`) with `dL/dz = coef · (onehot(target)
    /// − exp(z − lse))`.
    #[allow(clippy::too_many_arguments)]
    pub fn scoring_backward<E: Float>(
        &self,
        z: &mut impl AsView<E>,
        rows: usize,
        vocab: usize,
        targets: &impl AsView<u32>,
        lse: &impl AsView<f32>,
        coef: &impl AsView<f32>,
        row0: usize,
    ) -> Result<()> {
        let (z, targets, lse, coef) = (z.view(), targets.view(), lse.view(), coef.view());
        check_chunk(
            "scoring_backward",
            z.len(),
            rows,
            vocab,
            targets.len(),
            row0,
        )?;
        same_len("scoring_backward lse", targets, lse)?;
        same_len("scoring_backward coef", targets, coef)?;
        let mut args = KernelArgs::new();
        args.buffer(&z)
            .arg(rows as i32)
            .arg(vocab as i32)
            .buffer(&targets)
            .buffer(&lse)
            .buffer(&coef)
            .arg(row0 as i64);
        self.launch(&format!("scoring_backward_{}", E::DTYPE), rows, &args)
    }

    /// `stats [responses, 3] = (S, A, E)` of every span (fp64; E is NaN without an EOS).
    pub fn response_stats(
        &self,
        logp: &impl AsView<f32>,
        spans: &Spans,
        stats: &mut impl AsView<f64>,
    ) -> Result<()> {
        let (logp, stats) = (logp.view(), stats.view());
        ensure!(
            logp.len() == spans.rows,
            "response_stats: {} log-probs for spans over {} rows",
            logp.len(),
            spans.rows
        );
        ensure!(
            stats.len() == 3 * spans.responses,
            "response_stats: {} responses need {} statistics, got {}",
            spans.responses,
            3 * spans.responses,
            stats.len()
        );
        let mut args = KernelArgs::new();
        args.buffer(&logp)
            .buffer(&spans.table)
            .arg(spans.responses as i32)
            .buffer(&stats);
        self.launch("scoring_response_stats", spans.responses, &args)
    }

    /// `coef[t] = scale · dL/dlogp_t` for every prediction row, from `grads [responses, 3] =
    /// (dL/dS, dL/dA, dL/dE)`; rows of no span get 0.
    pub fn row_coef(
        &self,
        spans: &Spans,
        grads: &impl AsView<f64>,
        scale: f64,
        coef: &mut impl AsView<f32>,
    ) -> Result<()> {
        let (grads, coef) = (grads.view(), coef.view());
        ensure!(
            grads.len() == 3 * spans.responses,
            "row_coef: {} responses need {} gradients, got {}",
            spans.responses,
            3 * spans.responses,
            grads.len()
        );
        ensure!(
            coef.len() == spans.rows,
            "row_coef: spans over {} rows, {} coefficients",
            spans.rows,
            coef.len()
        );
        if !spans.tiles_rows {
            self.device.zero(&mut coef.view())?;
        }
        let mut args = KernelArgs::new();
        args.buffer(&spans.table)
            .buffer(&grads)
            .arg(spans.responses as i32)
            .arg(scale)
            .buffer(&coef);
        self.launch("scoring_row_coef", spans.responses, &args)
    }
}

fn check_chunk(
    what: &str,
    z_len: usize,
    rows: usize,
    vocab: usize,
    batch_rows: usize,
    row0: usize,
) -> Result<()> {
    ensure!(
        vocab > 0 && vocab <= i32::MAX as usize && batch_rows <= i32::MAX as usize,
        "{what}: a vocabulary of {vocab} and {batch_rows} rows must fit a 32-bit int"
    );
    ensure!(
        rows.checked_mul(vocab).is_some_and(|n| n <= z_len),
        "{what}: {rows} rows of {vocab} logits overrun a chunk of {z_len}"
    );
    ensure!(
        row0 + rows <= batch_rows,
        "{what}: rows {row0}..{} of a batch of {batch_rows}",
        row0 + rows
    );
    Ok(())
}

/// The chunked driver: GEMMs and kernels over the prediction rows of a batch, `chunk_rows`
/// at a time.
pub struct FusedScoring<'a> {
    pub kernels: &'a Kernels<'a>,
    pub chunk_rows: usize,
}

impl<'a> FusedScoring<'a> {
    /// Chunks of at most [`DEFAULT_CHUNK_BYTES`] of logits of `E`.
    pub fn new<E>(kernels: &'a Kernels<'a>, vocab: usize) -> Self {
        FusedScoring {
            kernels,
            chunk_rows: chunk_rows_for::<E>(vocab, DEFAULT_CHUNK_BYTES),
        }
    }

    /// The device memory the pass needs beyond its inputs and outputs: one chunk of logits.
    pub fn extra_bytes<E>(&self, rows: usize, vocab: usize) -> usize {
        self.chunk_rows.min(rows).max(1) * vocab * size_of::<E>()
    }

    fn shape<E: Float>(
        &self,
        h: &impl AsView<E>,
        head: &impl AsView<E>,
        targets: &impl AsView<u32>,
        d: usize,
    ) -> Result<(usize, usize)> {
        let (h, head, targets) = (h.view(), head.view(), targets.view());
        let vocab = rows_of("scoring: LM head", head.len(), d)?;
        let rows = targets.len();
        ensure!(
            h.len() == rows * d,
            "scoring: {rows} targets need {} hidden-state elements, got {}",
            rows * d,
            h.len()
        );
        Ok((rows, vocab))
    }

    /// The chunks of `rows`: (first row, rows) each.
    fn chunks(&self, rows: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = self.chunk_rows.max(1);
        (0..rows)
            .step_by(step)
            .map(move |start| (start, step.min(rows - start)))
    }

    /// The logits of rows `start..start + n` into the first `n` rows of `z`.
    fn logits<E: Float>(
        &self,
        h: View<E>,
        head: View<E>,
        (start, n): (usize, usize),
        d: usize,
        vocab: usize,
        z: &mut View<E>,
    ) -> Result<()> {
        self.kernels.device.gemm_at(
            &Gemm::projection(n, d, vocab),
            (&h, start * d),
            (&head, 0),
            (z, 0),
        )
    }

    /// Each row's log-sum-exp and target log-prob (fp32) from `h [rows, d]` and the LM head
    /// `[vocab, d]`.
    pub fn forward<E: Float>(
        &self,
        h: &impl AsView<E>,
        head: &impl AsView<E>,
        targets: &impl AsView<u32>,
        d: usize,
        lse: &mut impl AsView<f32>,
        logp: &mut impl AsView<f32>,
    ) -> Result<()> {
        let (h, head, targets, mut lse, mut logp) = (
            h.view(),
            head.view(),
            targets.view(),
            lse.view(),
            logp.view(),
        );
        let (rows, vocab) = self.shape(&h, &head, &targets, d)?;
        if rows == 0 {
            return Ok(());
        }
        let (mut z, _lease) = self
            .kernels
            .scratch
            .take::<E>(self.kernels.device, self.chunk_rows.min(rows) * vocab)?;
        for chunk in self.chunks(rows) {
            self.logits(h, head, chunk, d, vocab, &mut z)?;
            self.kernels
                .scoring_rows(&z, chunk.1, vocab, &targets, chunk.0, &mut lse, &mut logp)?;
        }
        Ok(())
    }

    /// Whether `rows` prediction rows are one chunk: one GEMM then makes the LM head's
    /// gradient, which may be stored as bf16 directly (one rounding of its fp32 sum).
    pub fn single_chunk(&self, rows: usize) -> bool {
        rows <= self.chunk_rows.max(1)
    }

    /// From `coef[t] = dL/dlogp_t`: overwrites `dh [rows, d]` with `dL/dh` and accumulates
    /// `dL/dW` into `dhead [vocab, d]`, or overwrites it as `write` says: the first chunk's
    /// GEMM then takes `β = 0`. `dhead` is fp32, or bf16 when the rows are one chunk
    /// ([`FusedScoring::single_chunk`]): chunks summed in bf16 would round once a chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<E: Float, G: Float>(
        &self,
        h: &impl AsView<E>,
        head: &impl AsView<E>,
        targets: &impl AsView<u32>,
        lse: &impl AsView<f32>,
        coef: &impl AsView<f32>,
        d: usize,
        dh: &mut impl AsView<E>,
        (dhead, write): (&mut impl AsView<G>, GradWrite),
    ) -> Result<()> {
        let (h, head, targets, lse, coef, mut dh, mut dhead) = (
            h.view(),
            head.view(),
            targets.view(),
            lse.view(),
            coef.view(),
            dh.view(),
            dhead.view(),
        );
        let (rows, vocab) = self.shape(&h, &head, &targets, d)?;
        same_len("scoring backward dh", h, dh)?;
        same_len("scoring backward dhead", head, dhead)?;
        ensure!(
            G::DTYPE == "f32" || self.single_chunk(rows),
            "scoring backward: {rows} rows take {} chunks of {}, whose sum into a {} LM-head \
             gradient would round once a chunk: sum them in f32",
            rows.div_ceil(self.chunk_rows.max(1)),
            self.chunk_rows,
            G::DTYPE
        );
        if rows == 0 {
            if write == GradWrite::Overwrite {
                self.kernels.device.zero(&mut dhead)?;
            }
            return Ok(());
        }
        let device = self.kernels.device;
        let (mut z, _lease) = self
            .kernels
            .scratch
            .take::<E>(device, self.chunk_rows.min(rows) * vocab)?;
        for chunk in self.chunks(rows) {
            let (start, n) = chunk;
            self.logits(h, head, chunk, d, vocab, &mut z)?;
            self.kernels
                .scoring_backward(&mut z, n, vocab, &targets, &lse, &coef, start)?;
            device.gemm_at(
                &Gemm::projection_input_grad(n, d, vocab),
                (&z, 0),
                (&head, 0),
                (&mut dh, start * d),
            )?;
            // Only the first chunk may overwrite: the later ones add to it.
            let chunk_write = if start == 0 {
                write
            } else {
                GradWrite::Accumulate
            };
            let weight_grad = Gemm {
                beta: chunk_write.beta(),
                ..Gemm::projection_weight_grad(n, d, vocab)
            };
            device.gemm_at(&weight_grad, (&z, 0), (&h, start * d), (&mut dhead, 0))?;
        }
        Ok(())
    }
}
