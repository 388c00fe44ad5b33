//! Every loss of docs/losses.md against the 37 float64 autograd cases of
//! `losses.golden.safetensors`: batch loss, per-group loss, dS and dE to 1e-9 relative.

mod common;

use common::golden_loss_cases;
use contralign::loss::{batch_loss, BatchInput};

fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(scale) + 1e-15
}

#[test]
fn all_golden_loss_cases() {
    let (cases, golden) = golden_loss_cases();
    for (case, spec) in cases {
        spec.validate().unwrap();
        let get = |k: &str| golden.get(&format!("{case}.{k}")).to_vec();
        let (s, s_ref, n, e_raw, r) = (get("S"), get("Sref"), get("n"), get("E"), get("r"));
        let offsets: Vec<usize> = get("offsets").iter().map(|&x| x as usize).collect();
        let a: Vec<f64> = s.iter().zip(&n).map(|(s, n)| s / n).collect();
        let e: Vec<Option<f64>> = e_raw.iter().map(|&x| (!x.is_nan()).then_some(x)).collect();
        let sources: Vec<String> = (0..offsets.len() - 1)
            .map(|g| format!("{case} group {g}"))
            .collect();
        let out = batch_loss(
            &spec,
            &BatchInput {
                s: &s,
                a: &a,
                e: &e,
                s_ref: Some(&s_ref),
                rewards: &r,
                offsets: &offsets,
                sources: &sources,
            },
        )
        .unwrap_or_else(|err| panic!("{case}: {err:#}"));
        let want_loss = golden.scalar(&format!("{case}.loss"));
        assert!(
            close(out.loss, want_loss, 0.0),
            "{case}: loss {} vs {want_loss}",
            out.loss
        );
        for (g, (&got, &want)) in out.per_group.iter().zip(&get("per_group")).enumerate() {
            assert!(
                close(got, want, 0.0),
                "{case}: group {g} loss {got} vs {want}"
            );
        }
        // The golden dS is the total derivative through A = S / n.
        let ds_scale = get("dS").iter().fold(0f64, |m, x| m.max(x.abs()));
        for (i, &want) in get("dS").iter().enumerate() {
            let got = out.d_s[i] + out.d_a[i] / n[i];
            assert!(
                close(got, want, ds_scale),
                "{case}: dS[{i}] {got} vs {want}"
            );
        }
        let de_scale = get("dE").iter().fold(0f64, |m, x| m.max(x.abs()));
        for (i, &want) in get("dE").iter().enumerate() {
            assert!(
                close(out.d_e[i], want, de_scale),
                "{case}: dE[{i}] {} vs {want}",
                out.d_e[i]
            );
        }
    }
}
