//! The workspace that device ops take their outputs from: segments of device memory, each
//! allocated once, whose aligned regions are leased out and come back when their [`Tensor`]
//! is dropped (first fit, neighbours merged; small leases from the top down). A training
//! step's shapes repeat, so after the first step the leases fit into what is already there
//! and the device allocates nothing; the
//! engine carves the first segment out of its arena, sized by its memory plan, so that even
//! the first step allocates nothing beyond it. A lease that fits nowhere adds a segment, so
//! an undersized plan costs an allocation: the pool's own segments double (few of them) up
//! to [`GROWTH_CAP`] beyond the lease, and the carved region never counts, so that a short
//! plan asks the GPU for about what it lacks, not for twice the arena's workspace.

use super::device::{AsView, Buffer, Device, Float, View, ALIGNMENT};
use crate::ops::storage::{Dtype, PARALLEL_CHUNK};
use anyhow::{Context, Result};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

struct Segment {
    memory: View<u8>,
    /// The allocation behind `memory` when the pool made it; `None` for a region of memory
    /// that its carver keeps alive ([`Pool::in_region`]).
    owned: Option<Buffer<u8>>,
    /// Free `(offset, bytes)` ranges, sorted by offset, never adjacent.
    free: Vec<(usize, usize)>,
}

/// The most bytes a segment the pool adds holds beyond the lease it is added for.
const GROWTH_CAP: usize = 1 << 30;

/// Leases of at most this many bytes are placed from a segment's top down, the others from
/// its bottom up: the small ones (statistics, tables, a loss's summary, index lists) often
/// outlive the large activations around them, and a small lease left between two large free
/// ranges would keep a later large lease from fitting in their sum.
const SMALL_LEASE: usize = 64 << 10;

impl Segment {
    fn take(&mut self, bytes: usize) -> Option<usize> {
        let fits = |&(_, len): &(usize, usize)| len >= bytes;
        let from_top = bytes <= SMALL_LEASE;
        let i = match from_top {
            true => self.free.iter().rposition(fits)?,
            false => self.free.iter().position(fits)?,
        };
        let (offset, len) = self.free[i];
        let (taken, rest) = match from_top {
            true => (offset + len - bytes, offset),
            false => (offset, offset + bytes),
        };
        if len == bytes {
            self.free.remove(i);
        } else {
            self.free[i] = (rest, len - bytes);
        }
        Some(taken)
    }

    fn give_back(&mut self, offset: usize, bytes: usize) {
        let i = self.free.partition_point(|&(o, _)| o < offset);
        self.free.insert(i, (offset, bytes));
        if i + 1 < self.free.len() && offset + bytes == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == offset {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

#[derive(Default)]
struct State {
    segments: Vec<Segment>,
    in_use: usize,
    peak: usize,
}

/// Leased regions of device memory; cheap to clone (one shared state).
#[derive(Clone, Default)]
pub struct Pool {
    state: Rc<RefCell<State>>,
}

/// A region of a [`Pool`], returned to it on drop.
pub struct Lease {
    state: Rc<RefCell<State>>,
    segment: usize,
    offset: usize,
    bytes: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.state.borrow_mut();
        state.in_use -= self.bytes;
        state.segments[self.segment].give_back(self.offset, self.bytes);
    }
}

impl Pool {
    /// A pool whose first segment is `region` (an [`super::device::Arena`]'s, which must
    /// outlive the pool and every view leased from it), its length rounded down to whole
    /// [`ALIGNMENT`]s.
    pub fn in_region(region: View<u8>) -> Result<Pool> {
        let bytes = region.len() / ALIGNMENT * ALIGNMENT;
        let memory = region.region::<u8>(0, bytes)?;
        let pool = Pool::default();
        if bytes > 0 {
            pool.state.borrow_mut().segments.push(Segment {
                memory,
                owned: None,
                free: vec![(0, bytes)],
            });
        }
        Ok(pool)
    }

    fn add_segment(&self, device: &Device, bytes: usize) -> Result<()> {
        let bytes = bytes.next_multiple_of(ALIGNMENT);
        let owned = device.alloc::<u8>(bytes)?;
        self.state.borrow_mut().segments.push(Segment {
            memory: owned.view(),
            owned: Some(owned),
            free: vec![(0, bytes)],
        });
        Ok(())
    }

    /// `len` elements of `T` (their contents are whatever the region last held).
    pub fn take<T: bytemuck::Pod>(&self, device: &Device, len: usize) -> Result<(View<T>, Lease)> {
        let bytes = (len * size_of::<T>()).max(1).next_multiple_of(ALIGNMENT);
        let found = self.find(bytes);
        let (segment, offset) = match found {
            Some(place) => place,
            None => {
                let last_owned = self
                    .state
                    .borrow()
                    .segments
                    .iter()
                    .rev()
                    .find(|s| s.owned.is_some())
                    .map_or(0, |s| s.memory.len());
                let growth = (2 * last_owned).min(bytes.saturating_add(GROWTH_CAP));
                self.add_segment(device, bytes.max(growth))?;
                self.find(bytes).expect("a new segment holds the lease")
            }
        };
        let mut state = self.state.borrow_mut();
        state.in_use += bytes;
        state.peak = state.peak.max(state.in_use);
        let view = state.segments[segment].memory.region::<T>(offset, len)?;
        Ok((
            view,
            Lease {
                state: self.state.clone(),
                segment,
                offset,
                bytes,
            },
        ))
    }

    fn find(&self, bytes: usize) -> Option<(usize, usize)> {
        let mut state = self.state.borrow_mut();
        state
            .segments
            .iter_mut()
            .enumerate()
            .find_map(|(i, s)| s.take(bytes).map(|offset| (i, offset)))
    }

    /// Bytes of device memory the pool allocated itself (beyond the region it was made in).
    pub fn allocated(&self) -> usize {
        self.state
            .borrow()
            .segments
            .iter()
            .filter(|s| s.owned.is_some())
            .map(|s| s.memory.len())
            .sum()
    }

    /// The most bytes leased at once.
    pub fn peak(&self) -> usize {
        self.state.borrow().peak
    }
}

/// A view of a [`Pool`] with its lease: index lists and other batch data on the device.
/// Several may share one lease (the lists of a batch, uploaded together).
pub struct Leased<T> {
    view: View<T>,
    lease: Rc<Lease>,
}

impl Leased<u8> {
    /// `len` elements of `T` from byte `offset` on, sharing this lease.
    pub fn part<T: bytemuck::Pod>(&self, offset: usize, len: usize) -> Result<Leased<T>> {
        Ok(Leased {
            view: self.view.region(offset, len)?,
            lease: self.lease.clone(),
        })
    }
}

impl<T: bytemuck::Pod> Leased<T> {
    pub fn len(&self) -> usize {
        self.view.len()
    }

    pub fn is_empty(&self) -> bool {
        self.view.is_empty()
    }

    pub fn device_ptr(&self) -> u64 {
        self.view.device_ptr()
    }
}

impl<T: bytemuck::Pod> AsView<T> for Leased<T> {
    fn view(&self) -> View<T> {
        self.view
    }
}

impl Pool {
    /// `len` elements of `T` in a region of the pool, undefined until written.
    pub fn lease<T: bytemuck::Pod>(&self, device: &Device, len: usize) -> Result<Leased<T>> {
        let (view, lease) = self.take::<T>(device, len)?;
        Ok(Leased {
            view,
            lease: Rc::new(lease),
        })
    }

    /// `data` on the device, in a region of the pool.
    pub fn upload<T: bytemuck::Pod>(&self, device: &Device, data: &[T]) -> Result<Leased<T>> {
        let mut leased = self.lease::<T>(device, data.len())?;
        device.copy_to(&mut leased.view, data)?;
        Ok(leased)
    }
}

/// What holds a [`Tensor`]'s memory.
enum Backing {
    /// Memory someone else owns for longer (the engine's parameter store).
    Borrowed,
    Leased {
        _lease: Lease,
    },
    /// A buffer of its own (the zeros a failed device returns, in host memory).
    Owned {
        _buffer: Buffer<f32>,
    },
}

/// A tensor's elements on the device, in the type they are stored in.
#[derive(Clone, Copy, Debug)]
pub enum TensorView {
    F32(View<f32>),
    Bf16(View<bf16>),
}

impl TensorView {
    pub fn dtype(&self) -> Dtype {
        match self {
            TensorView::F32(_) => Dtype::F32,
            TensorView::Bf16(_) => Dtype::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorView::F32(v) => v.len(),
            TensorView::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of the first element.
    pub fn device_ptr(&self) -> u64 {
        match self {
            TensorView::F32(v) => v.device_ptr(),
            TensorView::Bf16(v) => v.device_ptr(),
        }
    }

    /// The bytes the elements take.
    pub fn bytes(&self) -> usize {
        match self {
            TensorView::F32(v) => 4 * v.len(),
            TensorView::Bf16(v) => 2 * v.len(),
        }
    }

    /// Elements `offset..offset + len`, in the same type.
    pub fn slice(&self, offset: usize, len: usize) -> Result<TensorView> {
        Ok(match self {
            TensorView::F32(v) => TensorView::F32(v.slice(offset, len)?),
            TensorView::Bf16(v) => TensorView::Bf16(v.slice(offset, len)?),
        })
    }

    /// The elements as f32 on the host (bf16 widens exactly).
    pub fn download(&self, device: &Device) -> Result<Vec<f32>> {
        match self {
            TensorView::F32(v) => device.download(v),
            TensorView::Bf16(v) => Ok(device.download(v)?.into_iter().map(f32::from).collect()),
        }
    }

    /// Overwrites the elements with `data`, rounded to nearest in their type.
    pub fn upload(&self, device: &Device, data: &[f32]) -> Result<()> {
        match *self {
            TensorView::F32(mut v) => device.copy_to(&mut v, data),
            TensorView::Bf16(mut v) => {
                let data: Vec<bf16> = data
                    .par_chunks(PARALLEL_CHUNK)
                    .flat_map_iter(|chunk| chunk.iter().map(|&x| bf16::from_f32(x)))
                    .collect();
                device.copy_to(&mut v, &data)
            }
        }
    }
}

/// The storage types a [`Tensor`] can hold: a view of `Self` in and out of a [`TensorView`].
pub trait Stored: Float {
    const STORED: Dtype;
    fn wrap(view: View<Self>) -> TensorView;
    fn unwrap(view: TensorView) -> Option<View<Self>>;
}

impl Stored for f32 {
    const STORED: Dtype = Dtype::F32;
    fn wrap(view: View<f32>) -> TensorView {
        TensorView::F32(view)
    }
    fn unwrap(view: TensorView) -> Option<View<f32>> {
        match view {
            TensorView::F32(v) => Some(v),
            TensorView::Bf16(_) => None,
        }
    }
}

impl Stored for bf16 {
    const STORED: Dtype = Dtype::Bf16;
    fn wrap(view: View<bf16>) -> TensorView {
        TensorView::Bf16(view)
    }
    fn unwrap(view: TensorView) -> Option<View<bf16>> {
        match view {
            TensorView::Bf16(v) => Some(v),
            TensorView::F32(_) => None,
        }
    }
}

/// A tensor of the device model, f32 or bf16 (docs/numerics.md §2): a view and what keeps
/// it alive.
pub struct Tensor {
    view: TensorView,
    _backing: Backing,
}

impl Tensor {
    pub fn leased<E: Stored>(view: View<E>, lease: Lease) -> Tensor {
        Tensor {
            view: E::wrap(view),
            _backing: Backing::Leased { _lease: lease },
        }
    }

    /// A tensor over memory that outlives it.
    pub fn borrowed(view: TensorView) -> Tensor {
        Tensor {
            view,
            _backing: Backing::Borrowed,
        }
    }

    pub fn owned(buffer: Buffer<f32>) -> Tensor {
        Tensor {
            view: TensorView::F32(buffer.view()),
            _backing: Backing::Owned { _buffer: buffer },
        }
    }

    pub fn dtype(&self) -> Dtype {
        self.view.dtype()
    }

    pub fn storage(&self) -> TensorView {
        self.view
    }

    /// The elements as `E`, or an error naming `what` when they are stored otherwise.
    pub fn view_as<E: Stored>(&self, what: &str) -> Result<View<E>> {
        E::unwrap(self.view).with_context(|| {
            format!(
                "{what}: a {} tensor where {} was expected",
                self.dtype().name(),
                E::STORED.name()
            )
        })
    }

    pub fn len(&self) -> usize {
        self.view.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
