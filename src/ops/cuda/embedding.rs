//! The embedding backward on a device (`cuda/embedding.cu`): a token's gradient row added into
//! its id's row of the table gradient, with the ids grouped by value on the host ([`IdRows`],
//! staged with the batch's other lists), so that one block owns one id's row: every row is
//! read and written once, repeated ids add in token order as the CPU does, and no atomics are
//! needed.

use super::device::{AsView, Float};
use super::emu::{KernelArgs, LaunchConfig};
use super::kernels::{chunk, rows_of, Kernels};
use super::lists::{ListSource, StagedLists};
use super::pool::Leased;
use anyhow::{ensure, Result};
use std::rc::Rc;

/// Threads per block, each owning one chunk of a table row's columns.
const THREADS: u32 = 128;

/// A list of token ids grouped by value: `order` holds the token indices sorted by id
/// (stably: token order within an id), and group `g` is id `unique[g]`'s tokens
/// `order[starts[g]..starts[g + 1]]`.
pub struct IdRows {
    pub order: Vec<u32>,
    pub unique: Vec<u32>,
    pub starts: Vec<u32>,
}

impl IdRows {
    pub fn new(ids: &[u32]) -> Self {
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&t| ids[t as usize]);
        let (mut unique, mut starts) = (Vec::new(), Vec::new());
        for (i, &t) in order.iter().enumerate() {
            let id = ids[t as usize];
            if unique.last() != Some(&id) {
                unique.push(id);
                starts.push(i as u32);
            }
        }
        starts.push(ids.len() as u32);
        IdRows {
            order,
            unique,
            starts,
        }
    }

    /// The three lists, for a batch's staging.
    pub fn stage(&self, staged: &mut StagedLists) {
        for list in [&self.order, &self.unique, &self.starts] {
            staged.push(list);
        }
    }

    /// The lists on the device, from `source`.
    pub fn on_device(&self, source: &impl ListSource) -> Result<DeviceIdRows> {
        Ok(DeviceIdRows {
            order: source.list(&self.order)?,
            unique: source.list(&self.unique)?,
            starts: source.list(&self.starts)?,
        })
    }
}

/// [`IdRows`] on the device.
pub struct DeviceIdRows {
    order: Rc<Leased<u32>>,
    unique: Rc<Leased<u32>>,
    starts: Rc<Leased<u32>>,
}

impl Kernels<'_> {
    /// `dtable[id] += dout[t]` for every token `t` of `rows`, in fp32, each touched row
    /// rounded once to `G`.
    pub fn embedding_backward<E: Float, G: Float>(
        &self,
        dout: &impl AsView<E>,
        rows: &DeviceIdRows,
        dtable: &mut impl AsView<G>,
        d: usize,
    ) -> Result<()> {
        let (dout, dtable) = (dout.view(), dtable.view());
        let vocab = rows_of("embedding table gradient", dtable.len(), d)?;
        let (tokens, groups) = (rows.order.len(), rows.unique.len());
        ensure!(
            dout.len() == tokens * d,
            "embedding_backward: {tokens} ids need {} gradient elements, got {}",
            tokens * d,
            dout.len()
        );
        ensure!(
            rows.starts.len() == groups + 1,
            "embedding_backward: {} group starts for {groups} distinct ids",
            rows.starts.len()
        );
        ensure!(
            d <= i32::MAX as usize && groups <= i32::MAX as usize,
            "embedding_backward: {groups} ids of width {d} exceed the kernel's grid"
        );
        if groups == 0 {
            return Ok(());
        }
        let mut args = KernelArgs::new();
        args.buffer(&dout)
            .buffer(&rows.order)
            .buffer(&rows.unique)
            .buffer(&rows.starts)
            .buffer(&dtable)
            .arg(d as i32)
            .arg(vocab as u32);
        // A thread's columns: 16 bytes of the wider type (cuda/embedding.cu).
        let columns_per_block = THREADS as usize * chunk::<E>().min(chunk::<G>());
        let grid = (groups as u32, d.div_ceil(columns_per_block) as u32);
        let name = format!("embedding_backward_{}_{}", E::DTYPE, G::DTYPE);
        // SAFETY: live buffers of the device: `dout` holds `tokens` rows of `d`, the lists
        // index tokens below `tokens` (their lengths checked above, their values made by
        // `IdRows`), and the kernel traps on an id past the table's `vocab` rows.
        unsafe {
            self.device
                .launch(&name, LaunchConfig::new(grid, THREADS, 0), &args)
        }
    }
}
