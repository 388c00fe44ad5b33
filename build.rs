//! Build script. With `--features cuda` it will compile `cuda/*.cu` to PTX; the CUDA backend
//! is not written yet, so asking for it is a clear build error rather than a silent no-op.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        panic!(
            "the `cuda` feature is reserved for the CUDA backend, which is not implemented yet; \
             build without `--features cuda` to use the CPU backend"
        );
    }
}
