//! Training: the optimizer, learning-rate schedules and gradient clipping.

pub mod optimizer;
pub mod schedule;
