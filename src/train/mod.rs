//! Training: the step plan, the optimizer, learning-rate schedules and gradient clipping,
//! the reference cache, checkpoints and the loop.

pub mod held_out;
pub mod plan;
pub mod refcache;
pub mod rounded;
pub mod run_dir;
pub mod schedule;
pub mod session;
pub mod trainer;

/// AdamW and clipping live with the ops, which the device kernels mirror; training reads them
/// here too.
pub use crate::ops::optimizer;
