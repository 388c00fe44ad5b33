//! A batch's host lists on the device (docs/architecture.md §12): token ids, positions, the
//! packed attention layout and its tile lists, targets, response spans, row weights and the
//! loss's inputs. They are found by their contents, so that a list handed to many ops (the
//! positions to every layer's RoPE, forward, backward and recomputation) goes up once; and
//! a micro-batch stages all of them ahead of its pass, so that they go up together in one
//! copy instead of one per list.

use super::device::{Device, ALIGNMENT};
use super::pool::{Leased, Pool};
use anyhow::{Context, Result};
use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::rc::Rc;

/// Where a batch's host lists get their device copies.
pub trait ListSource {
    /// `values` on the device.
    fn list<T: bytemuck::Pod + 'static>(&self, values: &[T]) -> Result<Rc<Leased<T>>>;
}

/// Each list uploaded on its own into a region of `pool`: for kernels run outside a model's
/// pass (benchmarks, the selftest).
pub struct Uploads<'a> {
    pub device: &'a Device,
    pub pool: &'a Pool,
}

impl ListSource for Uploads<'_> {
    fn list<T: bytemuck::Pod + 'static>(&self, values: &[T]) -> Result<Rc<Leased<T>>> {
        Ok(Rc::new(self.pool.upload(self.device, values)?))
    }
}

/// A list's device copy, made from the one upload of its staging.
type MakeList = fn(&Leased<u8>, usize, usize) -> Result<Rc<dyn Any>>;

fn make_list<T: bytemuck::Pod + 'static>(
    upload: &Leased<u8>,
    offset: usize,
    len: usize,
) -> Result<Rc<dyn Any>> {
    Ok(Rc::new(upload.part::<T>(offset, len)?))
}

/// One host list: its type and bytes.
#[derive(PartialEq)]
struct HostList {
    type_id: TypeId,
    bytes: Vec<u8>,
}

impl HostList {
    fn new<T: bytemuck::Pod + 'static>(values: &[T]) -> Self {
        HostList {
            type_id: TypeId::of::<T>(),
            bytes: bytemuck::cast_slice(values).to_vec(),
        }
    }

    fn holds<T: bytemuck::Pod + 'static>(&self, values: &[T]) -> bool {
        self.type_id == TypeId::of::<T>() && self.bytes == bytemuck::cast_slice::<T, u8>(values)
    }
}

/// Host lists gathered to go to the device in one copy, each at an [`ALIGNMENT`]-aligned
/// offset (so that kernels may load them 16 bytes at a time).
#[derive(Default)]
pub struct StagedLists {
    lists: Vec<(HostList, usize, MakeList)>,
}

impl StagedLists {
    /// Adds `values`, unless an equal list is there already.
    pub fn push<T: bytemuck::Pod + 'static>(&mut self, values: &[T]) {
        if !self.lists.iter().any(|(list, _, _)| list.holds(values)) {
            self.lists
                .push((HostList::new(values), values.len(), make_list::<T>));
        }
    }

    pub fn len(&self) -> usize {
        self.lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

/// A list on the device, with the host contents it was made from.
struct Kept {
    host: HostList,
    device: Rc<dyn Any>,
}

/// How many lists [`KeptLists`] keeps: a staged batch's (about 16), or the last lists asked
/// for one by one.
const KEPT_LISTS: usize = 64;

/// The device copies of the lists handed to a device's ops, found by their contents.
#[derive(Default)]
pub struct KeptLists {
    lists: RefCell<Vec<Kept>>,
}

impl KeptLists {
    fn find<T: bytemuck::Pod + 'static>(&self, values: &[T]) -> Option<Rc<Leased<T>>> {
        let lists = self.lists.borrow();
        let kept = lists.iter().find(|k| k.host.holds(values))?;
        kept.device.clone().downcast::<Leased<T>>().ok()
    }

    /// `values` on the device: the copy kept from before, or a fresh upload of its own.
    pub fn get<T: bytemuck::Pod + 'static>(
        &self,
        device: &Device,
        pool: &Pool,
        values: &[T],
    ) -> Result<Rc<Leased<T>>> {
        if let Some(found) = self.find(values) {
            return Ok(found);
        }
        let uploaded = Rc::new(pool.upload(device, values)?);
        let mut lists = self.lists.borrow_mut();
        if lists.len() == KEPT_LISTS {
            lists.remove(0);
        }
        lists.push(Kept {
            host: HostList::new(values),
            device: uploaded.clone(),
        });
        Ok(uploaded)
    }

    /// Makes `staged` the kept lists. When every one of them is kept already nothing moves;
    /// otherwise the lists of earlier batches go and the missing ones are uploaded in one
    /// copy into a region of `pool`.
    pub fn stage(&self, device: &Device, pool: &Pool, staged: StagedLists) -> Result<()> {
        let mut lists = self.lists.borrow_mut();
        let (kept, missing): (Vec<_>, Vec<_>) = staged
            .lists
            .into_iter()
            .partition(|(host, _, _)| lists.iter().any(|k| k.host == *host));
        if missing.is_empty() {
            return Ok(());
        }
        lists.retain(|k| kept.iter().any(|(host, _, _)| k.host == *host));
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(missing.len());
        for (host, _, _) in &missing {
            bytes.resize(bytes.len().next_multiple_of(ALIGNMENT), 0);
            offsets.push(bytes.len());
            bytes.extend_from_slice(&host.bytes);
        }
        let upload = pool
            .upload(device, &bytes)
            .context("uploading a batch's host lists")?;
        for ((host, len, make), offset) in missing.into_iter().zip(offsets) {
            let device = make(&upload, offset, len)?;
            lists.push(Kept { host, device });
        }
        Ok(())
    }
}
