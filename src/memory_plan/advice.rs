//! What to change when a plan does not fit: the flag that would shrink each of its
//! categories, tried by planning again, largest category first.

use super::{
    human_bytes, Category, MasterWeights, MemoryPlan, PlanOptions, PrecisionOptions,
    RecomputePolicy, ReferenceSource, StorageDtype,
};

/// The flag that shrinks `category` under `o`, with the options it gives.
fn change(category: Category, o: &PlanOptions) -> Option<(&'static str, PlanOptions)> {
    let p = o.precision;
    let bf16 = p.precision == StorageDtype::Bf16;
    let mut n = *o;
    let flag = match category {
        Category::Weights if !bf16 => {
            n.precision = PrecisionOptions::default();
            "--precision bf16"
        }
        Category::MasterWeights => {
            n.precision.master = MasterWeights::None;
            "--master none"
        }
        Category::Gradients if bf16 && p.grads == StorageDtype::F32 => {
            n.precision.grads = StorageDtype::Bf16;
            "--grads bf16"
        }
        Category::Moments if bf16 && p.moments == StorageDtype::F32 => {
            n.precision.moments = StorageDtype::Bf16;
            "--moments bf16"
        }
        Category::ReferenceWeights => {
            n.reference = ReferenceSource::Cached;
            "--reference cached (train: --ref-logps from precompute-ref instead of --ref-model)"
        }
        Category::KeptActivations | Category::RecomputeWorkspace
            if o.recompute != RecomputePolicy::Full =>
        {
            n.recompute = RecomputePolicy::Full;
            "--recompute full"
        }
        _ => return None,
    };
    Some((flag, n))
}

/// The largest `--micro-tokens` (a multiple of 128, below the plan's) whose plan fits.
pub(super) fn fitting_micro_tokens(plan: &MemoryPlan, memory: u64) -> Option<usize> {
    let fits = |t: usize| {
        let o = PlanOptions {
            micro_tokens: t,
            ..plan.options
        };
        MemoryPlan::new(&plan.cfg, &o).is_ok_and(|p| p.total() <= memory)
    };
    let (mut lo, mut hi) = (0, plan.options.micro_tokens.div_ceil(128));
    // Invariant: lo·128 fits (or lo = 0), hi·128 does not.
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid * 128) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo > 0).then_some(lo * 128)
}

pub(super) fn not_fitting(plan: &MemoryPlan, memory: u64) -> String {
    let total = plan.total();
    let mut categories = plan.categories();
    categories.sort_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
    let (largest, largest_bytes) = categories[0];
    let mut msg = format!(
        "the plan needs {} ({total} bytes) but --memory is {} ({memory} bytes): {} short. \
         Largest: {} {}.",
        human_bytes(total),
        human_bytes(memory),
        human_bytes(total - memory),
        largest.label(),
        human_bytes(largest_bytes),
    );
    let mut fitting = Vec::new();
    let mut not_enough = Vec::new();
    let mut tried = Vec::new();
    for &(category, bytes) in &categories {
        let Some((flag, options)) = change(category, &plan.options).filter(|_| bytes > 0) else {
            continue;
        };
        if tried.contains(&flag) {
            continue;
        }
        tried.push(flag);
        let Ok(next) = MemoryPlan::new(&plan.cfg, &options) else {
            continue;
        };
        let text = format!("{flag} ({})", human_bytes(next.total()));
        if next.total() <= memory {
            fitting.push(text);
        } else {
            not_enough.push(text);
        }
    }
    if let Some(t) = fitting_micro_tokens(plan, memory) {
        fitting.push(format!("--micro-tokens {t}"));
    }
    if !fitting.is_empty() {
        msg += &format!(" Each of these fits: {}.", fitting.join(", "));
    }
    if !not_enough.is_empty() {
        msg += &format!(" Not enough on its own: {}.", not_enough.join(", "));
    }
    let state: u64 = [
        Category::Weights,
        Category::MasterWeights,
        Category::Gradients,
        Category::Moments,
        Category::ReferenceWeights,
    ]
    .iter()
    .map(|&c| plan.category_bytes(c))
    .sum();
    if state > memory {
        msg += &format!(
            " The parameters' state alone (weights, master, gradients, moments, reference) \
             needs {}, more than --memory at any micro-batch size.",
            human_bytes(state)
        );
    }
    if fitting.is_empty() {
        msg += if not_enough.is_empty() {
            " No flag makes it fit, even at 128 micro-tokens: plan for a device with more memory."
        } else {
            " Combine them (and a smaller --micro-tokens), or plan for a device with more memory."
        };
    }
    msg
}
