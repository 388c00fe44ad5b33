//! The streamed safetensors writer (`checkpoint::save_f32`, `write_model_dir`) against the
//! safetensors crate's reader: every tensor's name, dtype, shape and bytes, the `format: pt`
//! metadata, on random tensors of awkward sizes (empty, odd lengths, one longer than the
//! writer's encoding chunk), in f32 and rounded to bf16 and f16, one file and shards.

mod common;

use contralign::checkpoint::{save_f32, write_model_dir, Tensor};
use rand::Rng;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::path::Path;
use tempfile::TempDir;

/// (name, shape, values) of tensors of awkward sizes, one over a million elements.
fn random_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = common::rng("safetensors_writer");
    [
        vec![3, 5],
        vec![0, 4],
        vec![1_048_579],
        vec![7],
        vec![2, 3, 11],
    ]
    .into_iter()
    .enumerate()
    .map(|(i, shape)| {
        let n = shape.iter().product();
        let values = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        (format!("model.t{i}.weight"), shape, values)
    })
    .collect()
}

fn views(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<Tensor<'_>> {
    tensors
        .iter()
        .map(|(name, shape, data)| Tensor {
            name: name.clone(),
            shape: shape.clone(),
            data,
        })
        .collect()
}

/// What the writer must have stored for `x` in `dtype`: little-endian, rounded to nearest.
fn stored(x: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => x
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => x
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Reads `path` with the safetensors crate and checks that it holds exactly `want` in
/// `dtype`, with the metadata transformers checks for.
fn assert_file_holds(path: &Path, want: &[&(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let bytes = std::fs::read(path).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let format = metadata.metadata().as_ref().and_then(|m| m.get("format"));
    assert_eq!(format.map(String::as_str), Some("pt"), "{}", path.display());
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), want.len(), "{}", path.display());
    for (name, shape, data) in want {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), dtype, "{name}");
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
        assert!(
            view.data() == stored(data, dtype).as_slice(),
            "{name}: bytes"
        );
    }
}

#[test]
fn save_f32_writes_what_the_safetensors_crate_reads_back() {
    let tensors = random_tensors();
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("state.safetensors");
    save_f32(&path, &views(&tensors)).unwrap();
    assert_file_holds(&path, &tensors.iter().collect::<Vec<_>>(), Dtype::F32);
}

#[test]
fn model_directories_in_every_dtype_one_file_or_shards() {
    let tensors = random_tensors();
    let config = serde_json::json!({"model_type": "mistral", "torch_dtype": "float32"});
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        for max_shard_bytes in [usize::MAX, 1 << 20] {
            let dir = TempDir::new().unwrap();
            write_model_dir(
                dir.path(),
                &config,
                &views(&tensors),
                dtype,
                max_shard_bytes,
                None,
            )
            .unwrap();
            let index = dir.path().join("model.safetensors.index.json");
            if max_shard_bytes == usize::MAX {
                assert!(!index.exists());
                let all: Vec<_> = tensors.iter().collect();
                assert_file_holds(&dir.path().join("model.safetensors"), &all, dtype);
                continue;
            }
            let index: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
            let map = index["weight_map"].as_object().unwrap();
            assert_eq!(map.len(), tensors.len());
            let mut files: Vec<&str> = map.values().map(|f| f.as_str().unwrap()).collect();
            files.sort_unstable();
            files.dedup();
            assert!(files.len() > 1, "{dtype:?}: {files:?}");
            for file in files {
                let held: Vec<_> = tensors.iter().filter(|t| map[&t.0] == file).collect();
                assert_file_holds(&dir.path().join(file), &held, dtype);
            }
        }
    }
}

#[test]
fn a_value_beyond_a_16_bit_range_is_refused_naming_the_tensor() {
    let mut data = vec![0.5f32; (1 << 20) + 3];
    let far = (1 << 20) + 1;
    data[far] = 70000.0;
    let tensors = vec![("w".to_string(), vec![data.len()], data)];
    let config = serde_json::json!({"model_type": "mistral", "torch_dtype": "float32"});
    let dir = TempDir::new().unwrap();
    let err = write_model_dir(
        dir.path(),
        &config,
        &views(&tensors),
        Dtype::F16,
        usize::MAX,
        None,
    )
    .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "tensor w holds 70000 at element {far}, beyond the range of float16"
        )),
        "{text}"
    );
    // bfloat16 holds it.
    write_model_dir(
        dir.path(),
        &config,
        &views(&tensors),
        Dtype::BF16,
        usize::MAX,
        None,
    )
    .unwrap();
}
