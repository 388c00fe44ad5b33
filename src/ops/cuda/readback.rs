//! Host memory that a device copies small results into while the host goes on: a training
//! step's logged scalars, queued as the device computes them and read a step later
//! (docs/architecture.md §12). On a GPU the memory is pinned, each copy is queued on the
//! device's stream and an event follows the last one, so queueing never waits; on the
//! emulator, whose work is done once queued, it is plain memory.

use super::device::{count, AsView, Device};
use anyhow::{ensure, Result};
use std::marker::PhantomData;

/// Bytes a readback first holds on a GPU: the logged scalars of a few hundred micro-batches.
#[cfg(feature = "cuda")]
const FIRST_CAPACITY: usize = 64 << 10;

/// Where the values of one queued copy will be in a [`Readback`].
#[derive(Debug)]
pub struct Slot<T> {
    at: usize,
    len: usize,
    _element: PhantomData<T>,
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Slot<T> {}

/// Copies queued from a device, read once [`Device::wait_readback`] has returned.
#[derive(Default)]
pub struct Readback {
    /// The emulator's copies.
    host: Vec<u8>,
    /// A GPU's copies.
    #[cfg(feature = "cuda")]
    pinned: Option<super::gpu::Pinned>,
    /// Bytes queued since the last [`Readback::clear`].
    used: usize,
    /// Whether a copy was queued since the last wait.
    pending: bool,
}

impl Readback {
    pub fn new() -> Readback {
        Readback::default()
    }

    /// Forgets the values read, so that the memory takes the next copies. The copies must be
    /// done: a GPU may still be writing the memory of a copy not waited for.
    pub fn clear(&mut self) -> Result<()> {
        ensure!(
            !self.pending,
            "a readback cleared before its copies were waited for"
        );
        self.used = 0;
        self.host.clear();
        Ok(())
    }

    /// The values of `slot`, once its copy has been waited for.
    pub fn read<T: bytemuck::Pod>(&self, slot: Slot<T>) -> Result<Vec<T>> {
        ensure!(
            !self.pending,
            "a readback read before its copies were waited for"
        );
        let end = slot.at + slot.len * size_of::<T>();
        ensure!(
            end <= self.used,
            "a readback slot past the {} bytes queued",
            self.used
        );
        let bytes = &self.bytes(end)[slot.at..end];
        Ok(bytes
            .chunks_exact(size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }

    /// The first `len` bytes copied.
    fn bytes(&self, len: usize) -> &[u8] {
        #[cfg(feature = "cuda")]
        if let Some(pinned) = &self.pinned {
            return pinned.bytes(len);
        }
        &self.host[..len]
    }
}

impl Device {
    /// Queues the copy of `src` (a buffer or a view) into `into`, after every launch before
    /// it, and returns where its values will be: on a GPU the host goes on while the copy
    /// runs, and reads the values after [`Device::wait_readback`].
    pub fn queue_download<T: bytemuck::Pod>(
        &self,
        src: &impl AsView<T>,
        into: &mut Readback,
    ) -> Result<Slot<T>> {
        let src = src.view();
        self.check_home(&src)?;
        let bytes = src.len() * size_of::<T>();
        // Each copy starts 8-byte aligned, as a DMA of f64s would want.
        let at = into.used.next_multiple_of(8);
        count(|c| {
            c.downloads += 1;
            c.downloaded_bytes += bytes as u64;
        });
        match self {
            Device::Emu => {
                into.host.resize(at, 0);
                into.host
                    .extend_from_slice(bytemuck::cast_slice(src.host().expect("checked")));
            }
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => {
                let pinned = match into.pinned.take() {
                    Some(p) if p.capacity() >= at + bytes => p,
                    old => grow(gpu, old, into.used, at + bytes)?,
                };
                let pinned = into.pinned.insert(pinned);
                // SAFETY: `src` holds `bytes` bytes of this GPU (checked above); the bytes
                // written are read only after `wait_readback`.
                unsafe { pinned.queue_from_device(at, src.device_ptr(), bytes)? };
            }
        }
        into.used = at + bytes;
        into.pending = true;
        Ok(Slot {
            at,
            len: src.len(),
            _element: PhantomData,
        })
    }

    /// Waits for every copy queued into `readback`; its values can be read from here on.
    pub fn wait_readback(&self, readback: &mut Readback) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(pinned) = &readback.pinned {
            pinned.wait()?;
        }
        readback.pending = false;
        Ok(())
    }
}

/// Pinned memory of at least `needed` bytes holding the `used` bytes of `old` (waited for
/// first): on the first copy, and when a step has more micro-batches than any before it.
#[cfg(feature = "cuda")]
fn grow(
    gpu: &super::gpu::Gpu,
    old: Option<super::gpu::Pinned>,
    used: usize,
    needed: usize,
) -> Result<super::gpu::Pinned> {
    let capacity = needed.next_power_of_two().max(FIRST_CAPACITY);
    let mut bigger = gpu.pinned(capacity)?;
    if let Some(old) = old {
        old.wait()?;
        bigger.fill(old.bytes(used));
    }
    Ok(bigger)
}
