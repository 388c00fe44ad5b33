//! The model on the device layer (`--device emu`; `ops::cuda::ops::DeviceOps`) against the CPU
//! reference: statistics, losses and every parameter gradient of a training step, on fresh
//! random groups of awkward sizes, for the dense and the mixture-of-experts fixture.

mod common;

use common::device_step::check_step_on_device;
use contralign::memory_plan::RecomputePolicy;
use contralign::ops::cuda::device::Device;
use contralign::ops::cuda::ops::DeviceOps;
use contralign::ops::Ops;

#[test]
fn a_mistral_step_on_the_emulated_device_matches_the_cpu() {
    check_step_on_device(&Device::Emu, "tiny-mistral", RecomputePolicy::None);
    check_step_on_device(&Device::Emu, "tiny-mistral", RecomputePolicy::Full);
    check_step_on_device(&Device::Emu, "tiny-mistral", RecomputePolicy::Selective);
}

#[test]
fn a_mixtral_step_on_the_emulated_device_matches_the_cpu() {
    check_step_on_device(&Device::Emu, "tiny-mixtral", RecomputePolicy::Full);
    check_step_on_device(&Device::Emu, "tiny-mixtral", RecomputePolicy::Selective);
}

#[test]
fn a_failing_device_op_is_reported_once_and_stops_the_work_after_it() {
    let device = Device::Emu;
    let ops = DeviceOps::new(&device);
    let table = ops.upload(&[1.0; 12]);
    // An id past a 4-row table: the kernel traps.
    let rows = ops.embedding(&table, &[1, 7], 3);
    let err = ops.check().unwrap_err();
    assert!(format!("{err:#}").contains("embedding"), "{err:#}");
    assert_eq!(ops.download(&rows), vec![0.0; 6]);
    ops.check().unwrap();
    let rows = ops.embedding(&table, &[1, 3], 3);
    assert_eq!(ops.download(&rows), vec![1.0; 6]);
    ops.check().unwrap();
}
