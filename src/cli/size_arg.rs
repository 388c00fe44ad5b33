//! Sizes on the command line: `5GB`, `500MB`, `79.5GiB`, `1024` (bytes).

use anyhow::{bail, Context, Result};

/// `text` in bytes; decimal units (`KB`, `MB`, `GB`, `TB`) as transformers'
/// `max_shard_size` reads them, binary ones with an `i` (`GiB`), any case; a bare number is
/// bytes. `flag` names the option in errors.
pub fn parse_size(flag: &str, text: &str) -> Result<u64> {
    parse_size_in(flag, text, 1.0)
}

/// [`parse_size`] where a bare number counts units of `bare` bytes (`--memory 80`: GB).
pub fn parse_size_in(flag: &str, text: &str, bare: f64) -> Result<u64> {
    let t = text.trim().to_ascii_uppercase();
    // The unit is the trailing letters, so that an exponent (`1e3GB`) stays in the number.
    let split = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
    let (digits, unit) = t.split_at(split);
    let scale: f64 = match unit {
        "" => bare,
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => bail!(
            "{flag} {text:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        ),
    };
    let n: f64 = digits
        .trim()
        .parse()
        .with_context(|| format!("{flag} {text:?}: expected a size like 5GB"))?;
    let bytes = n * scale;
    if !(n.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        bail!("{flag} must be at least 1 byte and below 2^64, found {text:?}");
    }
    Ok(bytes as u64)
}
