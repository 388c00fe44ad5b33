//! Helpers shared by the integration tests: fixture paths, golden tensors, error measures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A golden safetensors file (all F64), by name: `(shape, values)`.
pub struct Golden(pub HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Golden {
    pub fn load(name: &str) -> Self {
        let bytes = std::fs::read(fixture(name)).expect("golden file");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden safetensors");
        let mut map = HashMap::new();
        for (k, v) in st.tensors() {
            assert_eq!(v.dtype(), safetensors::Dtype::F64, "{k}");
            let vals = v
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            map.insert(k, (v.shape().to_vec(), vals));
        }
        Golden(map)
    }

    pub fn get(&self, key: &str) -> &[f64] {
        &self.0.get(key).unwrap_or_else(|| panic!("golden key {key} missing")).1
    }

    pub fn scalar(&self, key: &str) -> f64 {
        self.get(key)[0]
    }
}

/// `‖a − b‖ / ‖b‖` (absolute when `b` is all zeros).
pub fn rel_err<A: Copy + Into<f64>>(a: &[A], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((*x).into() - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

pub fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(err <= rel, "{what}: got {got}, want {want} (relative error {err:.3e} > {rel:.0e})");
}

/// The golden json's hyperparameters of one loss entry.
pub fn hyperparameters(model: &str, loss: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(&format!("{model}.golden.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["hyperparameters"][loss].clone()
}
