#!/usr/bin/env bash
# The GPU checks as prebuilt binaries, for a GPU machine that has no Rust toolchain:
#
#   tools/gpu-suite.sh prepare DIR   (here) builds with --features cuda the contralign binary,
#       the test executables of tests/gpu.rs and tests/kernels_emu.rs and the `kernels` bench,
#       strips them into DIR (a git-ignored folder, so that the device tool can carry it) and
#       packs them into DIR/suite.tar.xz when they are too large to carry loose.
#   tools/gpu-suite.sh run DIR OUT   (on the GPU machine) runs, each with a time limit and its
#       log in OUT: `contralign selftest --device cuda`, the GPU tests, the emulator tests (a
#       check that the binaries run there at all), the bench and `contralign bench attention`;
#       then writes OUT/summary.md (steps, exit statuses, times, the selftest table, the bench
#       summary, the attention bench's JSON). It carries on
#       past a failing step and exits non-zero if any failed.
#
# `run` fits the device tool's 600 s per command: its steps' limits add up to 540 s, and it
# expects about two minutes on an H200 (the bench takes most of it).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
names=(contralign test-gpu test-kernels-emu bench-kernels)
pack=suite.tar.xz
# What the device tool carries: 64 MiB in all; past this the binaries travel compressed.
loose_limit=$((60 << 20))

die() {
    echo "gpu-suite: $*" >&2
    exit 1
}

usage() {
    cat >&2 <<EOF
usage: $0 prepare DIR    build the suite into DIR (git-ignored, inside the repository)
       $0 run DIR OUT    run the suite from DIR on a GPU machine, logs and summary.md in OUT
EOF
    exit 2
}

# The executable of cargo target NAME of kind KIND, from cargo's JSON messages on stdin.
executable() {
    python3 -c '
import json, sys
name, kind = sys.argv[1], sys.argv[2]
found = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["target"]["name"] == name and kind in m["target"]["kind"]]
if not found:
    sys.exit(f"cargo built no {kind} named {name}")
print(found[-1])
' "$1" "$2"
}

prepare() {
    local dir=$1
    mkdir -p "$dir" || die "cannot create $dir"
    dir=$(cd "$dir" && pwd)
    cd "$root" || die "no repository at $root"
    # Only an ignored folder travels with the device tool's `carry`, and only one inside the
    # repository: a tracked one would also be committed, an outside one not sent.
    git check-ignore -q "$dir" || die "$dir is not ignored by git: use a folder like .gpu-suite/"
    bash tools/install-cuda-toolchain.sh || die "installing the CUDA toolchain failed"
    export PATH=$root/.cuda-toolchain/cuda/bin:$PATH

    local bin test_gpu test_emu bench
    # Global: the exit trap reads it after this function has returned.
    json=$(mktemp) || die "mktemp failed"
    trap 'rm -f "$json"' EXIT
    cargo build --release --features cuda --bin contralign --message-format=json >"$json" ||
        die "cargo build failed"
    bin=$(executable contralign bin <"$json") || die "no contralign binary"
    cargo test --release --features cuda --no-run --test gpu --test kernels_emu \
        --message-format=json >"$json" || die "building the tests failed"
    test_gpu=$(executable gpu test <"$json") || die "no tests/gpu.rs executable"
    test_emu=$(executable kernels_emu test <"$json") || die "no tests/kernels_emu.rs executable"
    cargo bench --features cuda --no-run --bench kernels --message-format=json >"$json" ||
        die "building the bench failed"
    bench=$(executable kernels bench <"$json") || die "no kernels bench executable"

    local name
    for name in "${names[@]}" "$pack"; do
        rm -f "${dir:?}/$name"
    done
    local -A built=([contralign]=$bin [test-gpu]=$test_gpu [test-kernels-emu]=$test_emu
        [bench-kernels]=$bench)
    for name in "${names[@]}"; do
        cp "${built[$name]}" "$dir/$name" || die "copying ${built[$name]} into $dir failed"
        strip "$dir/$name" || die "strip $dir/$name failed"
    done

    local total
    total=$(cd "$dir" && cat "${names[@]}" | wc -c)
    if ((total > loose_limit)); then
        echo "gpu-suite: $((total >> 20)) MiB loose is over $((loose_limit >> 20)) MiB: packing"
        (cd "$dir" && tar -cJf "$pack" "${names[@]}" && rm -f "${names[@]}") ||
            die "packing $dir/$pack failed"
    fi
    echo "gpu-suite: prepared $dir:"
    ls -l "$dir"
    total=$(du -cb "$dir"/* | tail -n 1 | cut -f 1)
    echo "gpu-suite: carry size $total bytes ($((total >> 20)) MiB; the device tool takes 64 MiB)"
    ((total <= 64 << 20)) || die "$dir is over the 64 MiB the device tool carries"
}

# Prints the folders that hold libcublas.so*, once each: CUDA toolkits' first, then those of
# pip's nvidia-cublas wheel (nvidia/cu13/lib or nvidia/cublas/lib), in python3's
# site-packages or in a virtual environment under /opt.
cublas_dirs() {
    {
        local d
        for d in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib \
            /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib; do
            compgen -G "$d/libcublas.so*" >/dev/null && echo "$d"
        done
        python3 -c '
import glob, os, site, sys
for root in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    for lib in glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcublas.so*")):
        print(os.path.dirname(lib))
' 2>/dev/null
    } | awk '!seen[$0]++'
}

now() {
    date +%s.%N
}

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $out/NAME.log and a row in
# the step table.
step() {
    local name=$1 limit=$2 start rc seconds command
    shift 2
    command=$(basename "$1")
    (($# > 1)) && command+=" ${*:2}"
    echo "== $name: $* (limit ${limit}s)"
    start=$(now)
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    seconds=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    local status=$rc
    case $rc in
        0) ;;
        124 | 137) status="$rc (timed out after ${limit}s)" ;;
    esac
    ((rc == 0)) || failed+=("$name")
    echo "== $name: exit $status in ${seconds}s"
    tail -n 5 "$out/$name.log"
    rows+=("| $name | \`$command\` | $status | $seconds |")
}

run() {
    local dir=$1
    out=$2
    mkdir -p "$out" || die "cannot create $out"
    [[ -d $dir ]] || die "no suite in $dir: run \`$0 prepare $dir\` first (and carry it)"
    out=$(cd "$out" && pwd)

    # A private copy: the carried folder may be read-only or have lost the executable bits.
    # Global: the exit trap reads it after this function has returned.
    bin=$(mktemp -d) || die "mktemp failed"
    trap 'rm -rf "$bin"' EXIT
    if [[ -f $dir/$pack ]]; then
        tar -xJf "$dir/$pack" -C "$bin" 2>/dev/null ||
            python3 -m tarfile -e "$dir/$pack" "$bin" ||
            die "unpacking $dir/$pack failed"
    else
        local name
        for name in "${names[@]}"; do
            [[ -f $dir/$name ]] || die "$dir/$name is missing: run \`$0 prepare $dir\`"
            cp "$dir/$name" "$bin/" || die "copying $dir/$name failed"
        done
    fi
    chmod +x "$bin"/* || die "chmod failed"

    local libs
    libs=$(cublas_dirs | paste -sd: -)
    if [[ -n $libs ]]; then
        export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
    local gpus
    if ! command -v nvidia-smi >/dev/null; then
        gpus="no nvidia-smi here"
    elif ! gpus=$(nvidia-smi -L 2>&1); then
        gpus="nvidia-smi -L failed: $gpus"
    fi
    {
        echo "host: $(uname -n), $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "GPUs: $gpus"
        echo "libcublas folders: ${libs:-none found (GEMMs will fail to load cuBLAS)}"
    } | tee "$out/environment.log"

    # The test executables were built elsewhere: point them at this checkout's fixtures.
    export CONTRALIGN_FIXTURES=$root/tests/fixtures
    failed=()
    rows=()
    # Where criterion keeps its estimates: thrown away, never in OUT.
    export CRITERION_HOME=$bin/criterion
    step selftest 60 "$bin/contralign" selftest --device cuda
    step test-gpu 150 "$bin/test-gpu" --nocapture --test-threads=1
    step test-kernels-emu 60 "$bin/test-kernels-emu"
    step bench 230 "$bin/bench-kernels" --bench --noplot
    step bench-attention 40 "$bin/contralign" bench attention --device cuda --reps 5

    {
        echo "# GPU suite"
        echo
        sed 's/^/    /' "$out/environment.log"
        echo
        echo "| step | command | exit | time (s) |"
        echo "|:--|:--|--:|--:|"
        printf '%s\n' "${rows[@]}"
        echo
        if ((${#failed[@]})); then
            echo "**Failed: ${failed[*]}** (their logs are below)"
        else
            echo "Every step passed."
        fi
        echo
        echo "## selftest (selftest.log)"
        echo
        echo '```'
        cat "$out/selftest.log"
        echo '```'
        echo
        echo "## test-gpu (the lines of test-gpu.log that say what ran)"
        echo
        echo '```'
        grep -E '^test |^seed |skipped: |launch failed as it should|panicked|FAIL' \
            "$out/test-gpu.log"
        echo '```'
        echo
        if grep -q '^## kernels bench summary' "$out/bench.log"; then
            sed -n '/^## kernels bench summary/,$p' "$out/bench.log"
        else
            echo "## kernels bench (end of bench.log)"
            echo
            echo '```'
            tail -n 20 "$out/bench.log"
            echo '```'
        fi
        echo
        echo "## contralign bench attention (bench-attention.log)"
        echo
        echo '```'
        cat "$out/bench-attention.log"
        echo '```'
        local name
        for name in "${failed[@]}"; do
            [[ $name == selftest ]] && continue
            echo
            echo "## $name.log, last 30 lines"
            echo
            echo '```'
            tail -n 30 "$out/$name.log"
            echo '```'
        done
    } >"$out/summary.md"
    echo
    cat "$out/summary.md"
    ((${#failed[@]} == 0))
}

case ${1:-} in
    prepare)
        (($# == 2)) || usage
        prepare "$2"
        ;;
    run)
        (($# == 3)) || usage
        run "$2" "$3"
        ;;
    *) usage ;;
esac
