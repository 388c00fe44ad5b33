#!/usr/bin/env bash
# Builds the PTX (`cargo build --release --features cuda`) and assembles every PTX file with
# ptxas for sm_80 and sm_90: any error fails; each kernel's registers and spills are printed.
# Needs nvcc/ptxas: tools/install-cuda-toolchain.sh (or NVCC / CUDA_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir=$(cargo build --release --features cuda --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "build-script-executed" and m["package_id"].find("contralign") >= 0:
        print(m["out_dir"])
')
ptx_dir="$out_dir/ptx"
if [ -n "${NVCC:-}" ]; then
  ptxas="$(dirname "$NVCC")/ptxas"
elif [ -n "${CUDA_HOME:-}" ]; then
  ptxas="$CUDA_HOME/bin/ptxas"
elif [ -x .cuda-toolchain/cuda/bin/ptxas ]; then
  ptxas=.cuda-toolchain/cuda/bin/ptxas
else
  ptxas=$(command -v ptxas || true)
fi
if [ -z "$ptxas" ] || [ ! -x "$ptxas" ]; then
  echo "ptxas not found: run tools/install-cuda-toolchain.sh" >&2
  exit 1
fi
shopt -s nullglob
files=("$ptx_dir"/*.ptx)
if [ ${#files[@]} -eq 0 ]; then
  echo "no PTX files in $ptx_dir" >&2
  exit 1
fi
for arch in sm_80 sm_90; do
  for ptx in "${files[@]}"; do
    echo "-- ptxas -arch=$arch $(basename "$ptx")"
    "$ptxas" -arch="$arch" -v -o /dev/null "$ptx" 2>&1 \
      | grep -E "Compiling entry|Used [0-9]+ registers|spill|error" | sed 's/^ptxas info    : //'
    "$ptxas" -arch="$arch" -o /dev/null "$ptx"
  done
done
echo "ptxas: ${#files[@]} PTX files assemble for sm_80 and sm_90"
