#!/usr/bin/env bash
# Builds the PTX (`cargo build --release --features cuda`) and assembles every PTX file with
# ptxas for sm_80 and sm_90: any error fails; each kernel's registers and spills are printed,
# and a function that spills registers (spill stores or loads) fails unless
# tools/ptx-spills-allowed.txt lists it with the reason; a kernel whose PTX does fp64
# arithmetic fails unless tools/ptx-f64-allowed.txt lists it with the reason.
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
# `NAME reason...` lines; `#` starts a comment.
allowed=$(sed -e 's/#.*//' tools/ptx-spills-allowed.txt | awk 'NF >= 2 { print $1 }')
spills=()
for arch in sm_80 sm_90; do
  for ptx in "${files[@]}"; do
    echo "-- ptxas -arch=$arch $(basename "$ptx")"
    # `log=$(...)` under `set -e` would exit on a ptxas error before its text is printed.
    if ! log=$("$ptxas" -arch="$arch" -v -o /dev/null "$ptx" 2>&1); then
      echo "$log" >&2
      echo "ptxas -arch=$arch failed on $(basename "$ptx")" >&2
      exit 1
    fi
    grep -E "Compiling entry|Used [0-9]+ registers|spill|error" <<<"$log" | sed 's/^ptxas info    : //'
    # The function of each "N bytes spill stores, M bytes spill loads" line is named by the
    # "Function properties for NAME" line before it.
    while read -r name; do
      grep -qxF "$name" <<<"$allowed" || spills+=("$name ($arch)")
    done < <(awk '/Function properties for/ { name = $NF }
                  /bytes spill stores/ { if ($5 + $9 > 0) print name }' <<<"$log")
  done
done
if ((${#spills[@]})); then
  echo "register spills in: ${spills[*]}" >&2
  echo "make the kernel fit its registers, or list it in tools/ptx-spills-allowed.txt with the reason" >&2
  exit 1
fi
echo "ptxas: ${#files[@]} PTX files assemble for sm_80 and sm_90, no register spills"

# fp64 arithmetic: an A100 and an H100 run it at half their fp32 rate (the AdamW update in
# double was slower than its bytes), so a kernel's PTX may do fp64 only where
# tools/ptx-f64-allowed.txt says why (per token, row or response; never per element of a large
# tensor). An f64 instruction elsewhere, often a double literal in float code, fails.
f64_allowed=$(sed -e 's/#.*//' tools/ptx-f64-allowed.txt | awk 'NF >= 2 { print $1 }')
f64_kernels=()
while read -r name count; do
  if grep -qxF "$name" <<<"$f64_allowed"; then
    echo "fp64: $name $count instructions (allowed)"
  else
    f64_kernels+=("$name ($count)")
  fi
done < <(awk '/^\.(visible )?\.entry / { name = $3; sub(/\(.*/, "", name) }
              /^\.(visible )?\.func / { name = "" }
              name != "" && /^[ \t]+(add|sub|mul|fma|div|sqrt|rcp|rsqrt|neg|abs|min|max|cvt|setp|ex2|lg2|sin|cos)[a-z0-9.]*\.f64/ { n[name]++ }
              END { for (k in n) print k, n[k] }' "${files[@]}" | sort)
if ((${#f64_kernels[@]})); then
  echo "fp64 arithmetic in: ${f64_kernels[*]}" >&2
  echo "compute in fp32 (a double literal such as 0.5 makes float code double: write 0.5f), or list the kernel in tools/ptx-f64-allowed.txt with the reason" >&2
  exit 1
fi
