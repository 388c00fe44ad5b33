//! Safetensors errors in words — what a file should hold and what it holds — instead of the
//! safetensors crate's variant names (`MetadataIncompleteBuffer`, `IoError(Os { .. })`).

use safetensors::SafeTensorError;

/// The header length a safetensors file starts with (8 bytes, little-endian), if it has one.
fn header_len(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// The file's header parsed as JSON, if the file holds as many bytes as its length says.
fn header_json(bytes: &[u8]) -> Option<serde_json::Result<serde_json::Value>> {
    let n = usize::try_from(header_len(bytes)?).ok()?;
    Some(serde_json::from_slice(
        bytes.get(8..8usize.checked_add(n)?)?,
    ))
}

/// Where the tensors of the file's JSON header say their data ends, if the header parses.
fn data_end(bytes: &[u8]) -> Option<u64> {
    header_json(bytes)?
        .ok()?
        .as_object()?
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(_, t)| t["data_offsets"][1].as_u64())
        .max()
}

/// The bytes of one element of a safetensors dtype, if it is one.
fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// What is wrong with the first tensor entry of the header that is malformed (no known
/// dtype, a shape or data_offsets that are not lists of sizes) or whose byte range does not
/// match its shape and dtype, as `tensor NAME: ...`.
fn bad_entry(bytes: &[u8]) -> Option<String> {
    let header = header_json(bytes)?.ok()?;
    let mut entries: Vec<_> = header
        .as_object()?
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let sizes = |v: &serde_json::Value| -> Option<Vec<u64>> {
        v.as_array()?.iter().map(|x| x.as_u64()).collect()
    };
    for (name, t) in entries {
        let Some(width) = t["dtype"].as_str().and_then(dtype_bytes) else {
            return Some(format!("tensor {name}: unknown dtype {}", t["dtype"]));
        };
        let Some(shape) = sizes(&t["shape"]) else {
            return Some(format!(
                "tensor {name}: shape {} is not a list of sizes",
                t["shape"]
            ));
        };
        let offsets = sizes(&t["data_offsets"]).filter(|o| o.len() == 2 && o[0] <= o[1]);
        let Some(offsets) = offsets else {
            return Some(format!(
                "tensor {name}: data_offsets {} is not [start, end]",
                t["data_offsets"]
            ));
        };
        let needed = shape
            .iter()
            .try_fold(width, |n, &dim| n.checked_mul(dim))
            .map_or("more than 2^64".to_string(), |n| n.to_string());
        let given = offsets[1] - offsets[0];
        if needed != given.to_string() {
            return Some(format!(
                "tensor {name}: shape {shape:?} of {} needs {needed} bytes, data_offsets \
                 give {given}",
                t["dtype"].as_str().unwrap_or_default()
            ));
        }
    }
    None
}

/// Why a safetensors file could not be read or written. `bytes` is the file's content
/// when it was read (empty when it was written).
pub fn describe(err: &SafeTensorError, bytes: &[u8]) -> String {
    use SafeTensorError as E;
    let len = bytes.len() as u64;
    let claimed = header_len(bytes).unwrap_or(0);
    match err {
        E::HeaderTooSmall => format!(
            "the file has {len} bytes; a safetensors file starts with an 8-byte header length \
             (empty or truncated?)"
        ),
        E::InvalidHeaderLength => format!(
            "the header length says {claimed} bytes of header, but only {} bytes follow it \
             (truncated?)",
            len.saturating_sub(8)
        ),
        E::HeaderTooLarge => format!(
            "the header length says {claimed} bytes, more than the 100 MB a safetensors header \
             may take (not a safetensors file?)"
        ),
        E::InvalidHeader => "the header is not UTF-8 text (not a safetensors file?)".to_string(),
        E::InvalidHeaderStart => {
            "the header does not start with `{` (not a safetensors file?)".to_string()
        }
        E::InvalidHeaderDeserialization => match header_json(bytes) {
            Some(Err(e)) => format!("the header is not valid JSON: {e}"),
            _ => bad_entry(bytes).unwrap_or_else(|| {
                "the header is JSON but not a map of tensor names to their dtype, shape and \
                 data_offsets"
                    .to_string()
            }),
        },
        E::JsonError(e) => format!("the header is not valid JSON: {e}"),
        E::MetadataIncompleteBuffer => {
            let data = len.saturating_sub(8 + claimed);
            match data_end(bytes) {
                Some(end) => {
                    format!(
                    "the header's tensors take {end} bytes of data, but {data} bytes follow the \
                     header ({})",
                    if end > data { "truncated?" } else { "extra bytes" }
                )
                }
                None => format!(
                    "the header's tensors do not cover the {data} bytes that follow the header"
                ),
            }
        }
        E::InvalidOffset(name) => format!(
            "the header's byte range of tensor {name} does not start where the previous one ends"
        ),
        E::TensorInvalidInfo => bad_entry(bytes).unwrap_or_else(|| {
            "a tensor's byte range in the header does not match its shape and dtype".to_string()
        }),
        E::ValidationOverflow => "a tensor's shape in the header overflows its size".to_string(),
        E::TensorNotFound(name) => format!("no tensor {name}"),
        E::IoError(e) => e.to_string(),
        E::InvalidTensorView(dtype, shape, n) => {
            format!("{n} bytes do not hold a {dtype:?} tensor of shape {shape:?}")
        }
    }
}
