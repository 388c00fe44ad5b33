#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, the CUDA headers) from PyPI into
# .cuda-toolchain/ at the repository root (git-ignored), so that `cargo build --features cuda`
# can compile and ptxas-check the kernels on a machine with no GPU and no CUDA install.
#
# Every package is pinned to 13.0.x: the GPU machines run a CUDA 13.0 driver, which refuses
# the newer PTX ISA that later nvcc/nvvm releases emit (13.0 emits PTX 9.0).
#
# Idempotent: when the pinned set is already installed it only checks nvcc and returns.
# build.rs finds the result by itself; to point other tools at it:
#   export CUDA_HOME="$PWD/.cuda-toolchain/cuda"
#
# Environment: PYTHON (default python3) runs pip; CONTRALIGN_CUDA_TOOLCHAIN overrides the
# install folder (build.rs only looks in the default one; set NVCC or CUDA_HOME for another).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${CONTRALIGN_CUDA_TOOLCHAIN:-$root/.cuda-toolchain}
python=${PYTHON:-python3}

# nvidia-cuda-runtime and nvidia-cuda-cccl have their own 13.0 patch numbers.
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
want=$(printf '%s\n' "${pins[@]}")
stamp=$dest/installed-packages
nvcc=$dest/cuda/bin/nvcc

if [[ -x $nvcc && -f $stamp && $(<"$stamp") == "$want" ]]; then
    echo "CUDA toolchain already installed: $("$nvcc" --version | tail -n 1)"
    echo "nvcc: $nvcc"
    exit 0
fi

echo "Installing the CUDA 13.0 toolchain from PyPI into $dest"
mkdir -p "$dest"
# Install beside the old copy and swap at the end, so that an interrupted run never leaves
# a half-installed toolchain behind a valid stamp.
staging=$dest/staging
rm -rf "$staging"
# --no-deps: the wheels' own dependencies are runtime libraries the compiler does not need.
PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$staging" "${pins[@]}"

# The wheels share one toolkit tree; nvcc.profile locates cicc, libdevice and the headers
# relative to nvcc itself, so the tree works wherever it lands.
toolkit=$staging/nvidia/cu13
[[ -x $toolkit/bin/nvcc && -x $toolkit/bin/ptxas && -x $toolkit/nvvm/bin/cicc ]] || {
    echo "error: the installed wheels do not contain nvcc, ptxas and cicc under nvidia/cu13" >&2
    exit 1
}

# A smoke test: compile a kernel that uses bf16 and WMMA to PTX and assemble it for both
# GPU generations the project targets.
check=$staging/check
mkdir -p "$check"
cat >"$check/check.cu" <<'EOF'
#include <cuda_bf16.h>
#include <mma.h>
extern "C" __global__ void check(const __nv_bfloat16* a, float* out) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, a, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}
EOF
"$toolkit/bin/nvcc" --ptx -arch=compute_80 -o "$check/check.ptx" "$check/check.cu"
for sm in sm_80 sm_90; do
    "$toolkit/bin/ptxas" -arch=$sm -o /dev/null "$check/check.ptx"
done
rm -rf "$check"

printf '%s\n' "${pins[@]}" >"$staging/installed-packages"
# A stable name for the toolkit root (CUDA_HOME), independent of the wheels' layout.
ln -s nvidia/cu13 "$staging/cuda"
old=$dest/old
rm -rf "$old"
mkdir "$old"
for entry in "$dest"/*; do
    [[ $entry == "$staging" || $entry == "$old" ]] || mv "$entry" "$old/"
done
mv "$staging"/* "$dest/"
rmdir "$staging"
rm -rf "$old"

echo "Installed: $("$nvcc" --version | tail -n 1)"
echo "nvcc: $nvcc"
