#!/usr/bin/env bash
# The GPU checks and the performance scoreboard as prebuilt binaries, for a GPU machine that
# has no Rust toolchain, no TRL and no network:
#
#   tools/gpu-suite.sh prepare DIR   (here) builds with --features cuda the contralign binary,
#       the test executables of tests/gpu.rs and tests/kernels_emu.rs and the `kernels` bench,
#       strips them into DIR (a git-ignored folder, so that the device tool can carry it),
#       downloads into DIR/wheels the TRL release and the packages it needs that the GPU
#       machine lacks, packs the binaries into DIR/suite.tar.xz when loose they would leave
#       less than 4 MiB of the device tool's 64 free, and checks that DIR with the working
#       tree fits (naming what to drop if not).
#   tools/gpu-suite.sh run DIR OUT   (on the GPU machine) correctness: `contralign selftest
#       --device cuda`, the GPU tests, the emulator tests (a check that the binaries run there
#       at all) and the kernels bench; OUT/summary.md (steps, exit statuses, times, the
#       selftest table, the bench summary). It carries on past a failing step and exits
#       non-zero if any failed.
#   tools/gpu-suite.sh scoreboard DIR OUT   (on the GPU machine) contralign's bench modes
#       against their PyTorch/TRL baselines (tools/scoreboard/): OUT/scoreboard.md and
#       OUT/scoreboard.json (docs/cuda.md, "The scoreboard").
#   tools/gpu-suite.sh dry-run   (here, by hand) a venv with PyTorch (CPU use), transformers
#       and TRL from PyPI under target/, then every baseline and every contralign bench mode
#       that exists at tiny shapes in fp32 (contralign on --device emu with --precision f32 /
#       --dtype f32), each baseline's loss (and MoE's output and input gradient) checked
#       against contralign's dump of the same data to 1e-4 relative; it prints the table and
#       the checks and fails on a mismatch. The scoreboard of tiny shapes lands in
#       target/scoreboard-dry-run/.
#
# Budgets: `run` and `scoreboard` together stay inside 480 s by their own limits, so that one
# device call of both fits the tool's 600 s with room for a second, shorter one. A step's
# limit is a hard bound: TERM at the limit less 2 s, KILL at the limit. Unpacking the suite,
# the report and the packing of the logs have limits of their own, counted too:
#   run         150 s = unpack 10 + selftest 25 + test-gpu 70 + bench 20
#                     + test-kernels-emu 20 + summary and logs.tar.gz 5
#   scoreboard  330 s = unpack 10 + trl-site 10 + env 10 + scoring 15 + 20
#                     + attention 8 + 7 + 15 + dpo 30 + trl-dpo 35 + trl-step 25
#                     + nca 25 + 20 + contralign-7b 35 + mistral7b 30 + moe 10 + 15
#                     + report 5 + logs.tar.gz 5
#                     (contralign's side, then the baseline's, where a row has both; on the
#                     GPU trl-step, TRL's step reproduced, runs only where TRL itself failed;
#                     attention is two contralign runs, causal at 2048 and 8192 tokens and
#                     packed at one 2560-token group, then one baseline process timing all
#                     three: limits that are mostly process start-up and CUDA init)
# Each command keeps a running total: a step whose limit no longer fits what is left of its
# command's budget (less what its report and packing keep) is skipped, and its row says so.
# The Python baselines get their limit less their start-up as --budget-s and time fewer
# repetitions when it runs out. The dry run multiplies every limit by 4: it checks numbers
# on a 2-core machine whose start-ups are slower, not the GPU's budgets.
#
# OUT holds summary.md (run), scoreboard.md and scoreboard.json (scoreboard) and one
# logs.tar.gz of every step's log and result, which both commands add to: four files at
# most, inside the device tool's eight.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
names=(contralign test-gpu test-kernels-emu bench-kernels)
pack=suite.tar.xz
# What the device tool carries: 64 MiB in all. The binaries travel loose (no unpacking)
# while that leaves this much free, else compressed (xz: about a quarter of the size).
carry_limit=$((64 << 20))
pack_margin=$((4 << 20))
# TRL for the DPO row: 1.13.0 is the first release after transformers 5.17.0 (the GPU
# machine's), published the next day; it asks for transformers >= 4.56.2. The GPU machine has
# torch, transformers, accelerate and every dependency of datasets but dill and multiprocess
# (docs/cuda.md, "The scoreboard"); these versions satisfy datasets 4.8.5's pins.
wheels=(trl==1.13.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19)
# Layers of the Mistral-shaped DPO and NCA steps (the 7B's width and heads, the engine's
# default bf16 stores): few enough that set-up (random weights, the engine's arena) and 3
# steps fit their 30 s and 25 s limits with the baselines' 35 s and 20 s; a guess until a GPU
# has timed them (SCOREBOARD_LAYERS changes it).
step_layers=${SCOREBOARD_LAYERS:-4}
# Seconds between a step's TERM and its KILL, inside its limit.
kill_after=2
# The dry run's factor on every limit (see the budgets above).
limit_scale=1

die() {
    echo "gpu-suite: $*" >&2
    # After `begin`: OUT keeps its four files, the logs packed (or dropped) whatever failed.
    [[ -n ${logs:-} && -d $logs ]] && finish
    exit 1
}

usage() {
    cat >&2 <<USAGE
usage: $0 prepare DIR          build the suite into DIR (git-ignored, inside the repository)
       $0 run DIR OUT          correctness checks on a GPU machine: logs, summary.md in OUT
       $0 scoreboard DIR OUT   contralign vs PyTorch/TRL on a GPU machine: scoreboard.md/json
       $0 dry-run              every baseline and contralign row at tiny shapes on the CPU
USAGE
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

# The wheels of the GPU machine's Python (3.12, x86-64) for the packages it lacks.
download_wheels() {
    local dir=$1
    rm -rf "$dir" && mkdir -p "$dir" || die "cannot create $dir"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "${wheels[@]}" || die "pip download of ${wheels[*]} failed"
}

# The rest of the working tree travels with DIR: its tracked and untracked-not-ignored files.
tree_bytes() {
    (cd "$root" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- |
        tail -n 1 | cut -f 1)
}

# Fails naming what to drop when DIR with the repository's other travelling files is over
# what the device tool carries.
check_carry() {
    local dir=$1 total tree
    total=$(du -sb "$dir" | cut -f 1)
    tree=$(tree_bytes)
    echo "gpu-suite: carry size $total bytes in $dir + $tree bytes of the working tree" \
        "($(((total + tree) >> 20)) MiB; the device tool takes 64 MiB)"
    if ((total + tree > carry_limit)); then
        echo "gpu-suite: over by $(((total + tree - carry_limit) >> 10)) KiB; largest:" >&2
        du -ab "$dir" | sort -rn | head -n 8 >&2
        die "drop from $dir what the check does not need: bench-kernels (the run's bench step)," \
            "test-kernels-emu (runs here too), or the wheels (the DPO row then runs" \
            "tools/scoreboard/trl_step.py instead of TRL)"
    fi
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
    # build.rs takes NVCC (then CUDA_HOME, CUDA_PATH) before PATH: pin the toolchain whose PTX
    # (9.0) the GPU machines' CUDA 13.0 driver loads, whatever else this machine has.
    export NVCC=$root/.cuda-toolchain/cuda/bin/nvcc

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

    download_wheels "$dir/wheels"
    local loose others
    loose=$(cd "$dir" && cat "${names[@]}" | wc -c)
    others=$(($(du -sb "$dir/wheels" | cut -f 1) + $(tree_bytes)))
    if ((loose + others > carry_limit - pack_margin)); then
        echo "gpu-suite: with the binaries loose the carry is $(((loose + others) >> 10)) KiB," \
            "less than $((pack_margin >> 20)) MiB under $((carry_limit >> 20)) MiB: packing them"
        (cd "$dir" && tar -cJf "$pack" "${names[@]}" && rm -f "${names[@]}") ||
            die "packing $dir/$pack failed"
    fi
    echo "gpu-suite: prepared $dir:"
    ls -l "$dir" "$dir/wheels"
    check_carry "$dir"
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

# begin OUT BUDGET_S CLOSING_S: the logs folder (unpacking what an earlier command of the
# same OUT left in logs.tar.gz) and the command's budget, of which the last CLOSING_S seconds
# are kept for its report and the packing of the logs: steps must end before that.
begin() {
    out=$1
    mkdir -p "$out" || die "cannot create $out"
    out=$(cd "$out" && pwd)
    if [[ -f $out/logs.tar.gz ]]; then
        timeout 2 tar -xzf "$out/logs.tar.gz" -C "$out" ||
            echo "gpu-suite: unpacking $out/logs.tar.gz failed: its logs are lost" >&2
    fi
    logs=$out/logs
    mkdir -p "$logs" || die "cannot create $logs"
    deadline=$(awk -v a="$(now)" -v b="$2" -v c="$3" 'BEGIN { printf "%.1f", a + b - c }')
    failed=()
    rows=()
    steps_json=()
}

# Packs the logs into OUT/logs.tar.gz, the one file of them that comes back (within 5 s of
# the budget: past that, or on a failure, the logs are dropped rather than left loose).
finish() {
    timeout --kill-after=1 4 tar -czf "$out/logs.tar.gz" -C "$out" logs ||
        echo "gpu-suite: packing $out/logs.tar.gz failed: the logs are dropped" >&2
    rm -rf "$logs"
}

# step NAME LIMIT_S [--json FILE | --result FILE] COMMAND...: runs COMMAND with its output in
# $logs/NAME.log (stdout in FILE with --json; with --result, COMMAND writes FILE) and a row in
# the step table, TERM at LIMIT_S less $kill_after seconds and KILL at LIMIT_S; skipped when
# LIMIT_S is more than the command's budget has left. A skipped or failed step leaves in FILE
# why it has no figures (a failed command's own FILE stays).
step() {
    local name=$1 limit=$(($2 * limit_scale)) start rc seconds command json= result=
    shift 2
    case $1 in
        --json) json=$2 ;;
        --result) result=$2 ;;
    esac
    [[ $1 == --json || $1 == --result ]] && shift 2
    local file=${json:-$result}
    command=$(basename "$1")
    (($# > 1)) && command+=" ${*:2}"
    local left
    left=$(awk -v d="$deadline" -v n="$(now)" 'BEGIN { printf "%d", d - n }')
    if ((limit > left)); then
        echo "== $name: skipped: its ${limit}s limit does not fit the ${left}s left"
        rows+=("| $name | \`$command\` | skipped (${limit}s limit, ${left}s left) | 0 |")
        steps_json+=("{\"step\": \"$name\", \"exit\": \"skipped\", \"seconds\": 0, \"limit\": $limit}")
        [[ -n $file ]] && echo "{\"skipped\": \"its ${limit}s limit did not fit the ${left}s left\"}" >"$file"
        return 0
    fi
    echo "== $name: $* (limit ${limit}s)"
    start=$(now)
    local term=$((limit - kill_after))
    if [[ -n $json ]]; then
        timeout --kill-after=$kill_after $term "$@" >"$json" 2>"$logs/$name.log"
    else
        timeout --kill-after=$kill_after $term "$@" >"$logs/$name.log" 2>&1
    fi
    rc=$?
    seconds=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    local status=$rc
    case $rc in
        0) ;;
        124 | 137) status="$rc (timed out after ${term}s)" ;;
    esac
    if ((rc != 0)); then
        failed+=("$name")
        if [[ -n $json || (-n $result && ! -s $result) ]]; then
            echo "{\"failed\": \"exit $status, see $name.log in logs.tar.gz\"}" >"$file"
        fi
    fi
    echo "== $name: exit $status in ${seconds}s"
    tail -n 5 "$logs/$name.log"
    rows+=("| $name | \`$command\` | $status | $seconds |")
    steps_json+=("{\"step\": \"$name\", \"exit\": \"$status\", \"seconds\": $seconds, \"limit\": $limit}")
    return $rc
}

# The binaries in a private copy: the carried folder may be read-only or have lost the
# executable bits. Sets $bin (removed on exit). Within the 10 s the budgets give it, with
# begin's unpacking of an earlier logs.tar.gz (2 s at most).
unpack() {
    local dir=$1
    [[ -d $dir ]] || die "no suite in $dir: run \`$0 prepare $dir\` first (and carry it)"
    bin=$(mktemp -d) || die "mktemp failed"
    trap 'rm -rf "$bin"' EXIT
    if [[ -f $dir/$pack ]]; then
        timeout 3 tar -xJf "$dir/$pack" -C "$bin" 2>/dev/null ||
            timeout 3 python3 -m tarfile -e "$dir/$pack" "$bin" ||
            die "unpacking $dir/$pack failed"
    else
        local name
        for name in "${names[@]}"; do
            [[ -f $dir/$name ]] || die "$dir/$name is missing: run \`$0 prepare $dir\`"
            cp "$dir/$name" "$bin/" || die "copying $dir/$name failed"
        done
    fi
    chmod +x "$bin"/* || die "chmod failed"
    # The driver compiles the embedded PTX for the GPU when a process first loads it (ptxas
    # -arch=sm_90 takes 6 s for all the modules on this project's 2-core machine): its
    # cache, large enough for all of them, spares the later processes of the suite that.
    export CUDA_CACHE_DISABLE=0 CUDA_CACHE_MAXSIZE=$((1 << 30))
    local libs
    libs=$(cublas_dirs | paste -sd: -)
    if [[ -n $libs ]]; then
        export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
    local gpus
    if ! command -v nvidia-smi >/dev/null; then
        gpus="no nvidia-smi here"
    elif ! gpus=$(timeout 2 nvidia-smi -L 2>&1); then
        gpus="nvidia-smi -L failed: $gpus"
    fi
    {
        echo "host: $(uname -n), $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "GPUs: $gpus"
        echo "libcublas folders: ${libs:-none found (GEMMs will fail to load cuBLAS)}"
    } | tee "$logs/environment.log"
}

run() {
    begin "$2" 150 5
    unpack "$1"
    # The test executables were built elsewhere: point them at this checkout's fixtures.
    export CONTRALIGN_FIXTURES=$root/tests/fixtures
    # Where criterion keeps its estimates: thrown away, never in OUT.
    export CRITERION_HOME=$bin/criterion
    step selftest 25 "$bin/contralign" selftest --device cuda
    # The selftest step above is test-gpu's selftest_passes_on_the_gpu: not run twice.
    step test-gpu 70 "$bin/test-gpu" --ignored --nocapture --test-threads=1 \
        --skip selftest_passes_on_the_gpu
    # Criterion's part cut to 0.2 s a case (from 1.3 s; each case's own median, which the
    # bench summary reads, keeps its quarter second) to fit 20 s: the scoreboard measures the
    # kernels that matter side by side with their baselines.
    # Each case's time is printed as it is measured (the table only at the end), criterion's
    # bootstrap cut from 100000 resamples a case to 1000; no GPU fails the step.
    CONTRALIGN_REQUIRE_GPU=1 step bench 20 "$bin/bench-kernels" --bench --noplot \
        --warm-up-time 0.05 --measurement-time 0.15 --nresamples 1000
    # The emulator's tests need no GPU: last, so that what does comes first.
    step test-kernels-emu 20 "$bin/test-kernels-emu"

    {
        echo "# GPU suite"
        echo
        sed 's/^/    /' "$logs/environment.log"
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
        cat "$logs/selftest.log" 2>/dev/null
        echo '```'
        echo
        echo "## test-gpu (the lines of test-gpu.log that say what ran)"
        echo
        echo '```'
        grep -E '^test |^seed |skipped: |launch failed as it should|panicked|FAIL' \
            "$logs/test-gpu.log" 2>/dev/null
        echo '```'
        echo
        if grep -q '^## kernels bench summary' "$logs/bench.log" 2>/dev/null; then
            sed -n '/^## kernels bench summary/,$p' "$logs/bench.log"
        else
            echo "## kernels bench (no summary: the times as measured, and the end of bench.log)"
            echo
            echo '```'
            grep '^kernels bench' "$logs/bench.log" 2>/dev/null
            tail -n 5 "$logs/bench.log" 2>/dev/null
            echo '```'
        fi
        local name
        for name in "${failed[@]}"; do
            [[ $name == selftest ]] && continue
            echo
            echo "## $name.log, last 30 lines"
            echo
            echo '```'
            tail -n 30 "$logs/$name.log"
            echo '```'
        done
    } >"$out/summary.md"
    finish
    echo
    cat "$out/summary.md"
    ((${#failed[@]} == 0))
}

# missing RESULT WHAT: a row whose contralign feature is not in this binary.
missing() {
    echo "== $(basename "$1" .json): feature missing: $2"
    echo "{\"missing\": \"$2\"}" >"$1"
}

# has_mode BIN MODE [FLAG]: whether `contralign bench MODE` exists (and takes FLAG).
has_mode() {
    local help
    help=$("$1" bench "$2" --help 2>/dev/null) || return 1
    [[ -z ${3:-} ]] || grep -q -- "$3" <<<"$help"
}

# The scoreboard's rows (shared by `scoreboard` and `dry-run`): contralign bench modes with
# BIN on DEVICE, baselines with PYTHON (TRL's with TRL_PYTHON); SHAPE is gpu or tiny; results
# as JSON in RESULTS. Returns non-zero if a step failed.
rows_of() {
    local bin=$1 device=$2 python=$3 trl_python=$4 shape=$5 results=$6
    local tools=$root/tools/scoreboard dump=$results/dumps
    local -a c_scoring c_attention c_step c_7b c_moe p_common p_scoring p_attention p_step p_moe
    local attention_causal attention_packed
    if [[ $shape == gpu ]]; then
        c_scoring=(--dtype bf16 --reps 5)
        # Mistral-7B's attention (bench attention's default 32 heads, 8 KV heads, head dim
        # 128): plain causal at 2K and 8K, and one packed group (512 + 8 x 256).
        c_attention=(--dtype bf16 --reps 5)
        attention_causal=2048,8192
        attention_packed=2560
        c_step=(--layers "$step_layers" --groups 2 --prompt 512 --response-len 256 --steps 3)
        # Mistral-7B's own config (bench step's default) with all its layers.
        c_7b=(--layers 32 --groups 2 --prompt 512 --response-len 256 --steps 3)
        p_common=(--device cuda --dtype bf16)
        p_scoring=(--reps 5)
        p_attention=(--reps 5)
        p_step=(--layers "$step_layers" --groups 2 --prompt 512 --response-len 256 --reps 3)
        c_moe=()
        p_moe=(--tokens 4096 --reps 5 --budget-s 5)
    else
        # fp32 on both sides (bench step and bench moe default to bf16 stores), so that the
        # checks' 1e-4 compares the same computation.
        c_scoring=(--dtype f32 --rows 600 --vocab 96 --dim 32 --reps 1 --dump "$dump/scoring")
        # The GPU's three cases at a sixteenth: causal 128 and 512, one packed group of 160.
        c_attention=(--dtype f32 --heads 4 --kv-heads 2 --head-dim 16 --prompt 32
            --responses 4 --response-len 32 --reps 1 --dump "$dump/attention")
        attention_causal=128,512
        attention_packed=160
        c_step=(--config "$tools/tiny-mistral.json" --layers 2 --groups 2 --prompt 12
            --response-len 8 --steps 1 --gemm-size 64 --precision f32)
        # The baseline's 32-layer step at tiny width, dumped for its check.
        c_7b=(--config "$tools/tiny-mistral.json" --layers 32 --groups 2 --prompt 12
            --response-len 8 --steps 1 --gemm-size 64 --precision f32 --dump "$dump/7b")
        # tiny-mixtral.json's layer (d 64, F 96, 8 experts, top-2) at the baseline's 64
        # tokens, dumped for its check.
        c_moe=(--tokens 64 --dim 64 --ffn 96 --experts 8 --top-k 2 --reps 1 --dtype f32
            --dump "$dump/moe")
        p_common=(--device cpu --dtype fp32)
        p_scoring=(--rows 600 --vocab 96 --dim 32 --reps 1 --check "$dump/scoring")
        p_attention=(--heads 4 --kv-heads 2 --head-dim 16 --prompt 32
            --responses 4 --response-len 32 --reps 1 --check "$dump/attention")
        p_step=(--config "$tools/tiny-mistral.json" --layers 2 --groups 2 --prompt 12
            --response-len 8 --reps 1)
        p_moe=(--config "$tools/tiny-mixtral.json" --tokens 64 --reps 1 --check "$dump/moe")
    fi
    local c=$bin r=$results bad=0
    mkdir -p "$dump"
    # Each baseline's --budget-s: its step's limit less about 10 s of imports and set-up.
    step env 10 --result "$r/env.json" \
        "$python" "$tools/env_probe.py" "${p_common[@]:0:2}" --reps 5 --budget-s 5 \
        $([[ $shape == tiny ]] && echo --gemm-size 256 --copy-bytes 1000000) \
        --out "$r/env.json" || bad=1
    step contralign-scoring 15 --json "$r/contralign-scoring.json" \
        "$c" bench scoring --device "$device" "${c_scoring[@]}" || bad=1
    step scoring 20 --result "$r/scoring.json" \
        "$python" "$tools/scoring.py" "${p_common[@]}" "${p_scoring[@]}" \
        --budget-s 8 --out "$r/scoring.json" || bad=1
    # bench attention times every --tokens with every --mask: one run per mask gives exactly
    # the cases; attention.py pairs the i-th --mask with the i-th --tokens, all in one process.
    step contralign-attention-causal 8 --json "$r/contralign-attention-causal.json" \
        "$c" bench attention --device "$device" "${c_attention[@]}" --mask causal \
        --tokens "$attention_causal" || bad=1
    step contralign-attention-packed 7 --json "$r/contralign-attention-packed.json" \
        "$c" bench attention --device "$device" "${c_attention[@]}" --mask packed \
        --tokens "$attention_packed" || bad=1
    step attention 15 --result "$r/attention.json" \
        "$python" "$tools/attention.py" "${p_common[@]}" "${p_attention[@]}" \
        --mask causal --tokens "$attention_causal" --mask packed --tokens "$attention_packed" \
        --budget-s 5 --out "$r/attention.json" || bad=1
    step contralign-dpo 30 --json "$r/contralign-dpo.json" "$c" bench step --device "$device" \
        --loss dpo --responses 2 "${c_step[@]}" \
        $([[ $shape == tiny ]] && echo --dump "$dump/dpo") || bad=1
    local dpo_check=() nca_check=()
    if [[ $shape == tiny ]]; then
        dpo_check=(--check "$dump/dpo")
        nca_check=(--check "$dump/nca")
    fi
    if [[ -n $trl_python ]]; then
        # TRL's own trainer; its reproduction only where TRL did not run.
        step trl-dpo 35 --result "$r/trl-dpo.json" \
            "$trl_python" "$tools/trl_dpo.py" "${p_common[@]}" "${p_step[@]}" \
            "${dpo_check[@]}" --budget-s 15 --out "$r/trl-dpo.json" || bad=1
    else
        echo "{\"missing\": \"TRL did not unpack: see trl-site.log\"}" >"$r/trl-dpo.json"
    fi
    if [[ $shape == tiny ]] || grep -q '"failed"\|"missing"\|"skipped"' "$r/trl-dpo.json"; then
        step trl-step 25 --result "$r/trl-step.json" \
            "$python" "$tools/trl_step.py" "${p_common[@]}" "${p_step[@]}" \
            "${dpo_check[@]}" --budget-s 10 --out "$r/trl-step.json" || bad=1
    else
        echo '{"skipped": "TRL'"'"'s DPOTrainer ran: its reproduction runs where TRL fails"}' \
            >"$r/trl-step.json"
    fi
    step contralign-nca 25 --json "$r/contralign-nca.json" "$c" bench step --device "$device" \
        --loss nca --responses 4 "${c_step[@]}" \
        $([[ $shape == tiny ]] && echo --dump "$dump/nca") || bad=1
    step nca 20 --result "$r/nca.json" \
        "$python" "$tools/nca_step.py" "${p_common[@]}" "${p_step[@]}" --responses 4 \
        "${nca_check[@]}" --budget-s 8 --out "$r/nca.json" || bad=1
    if has_mode "$c" step --memory; then
        step contralign-7b 35 --json "$r/contralign-7b.json" "$c" bench step \
            --device "$device" --loss dpo --responses 2 --memory 80GB "${c_7b[@]}" || bad=1
    else
        missing "$r/contralign-7b.json" "bench step --memory (a step planned under a memory limit)"
    fi
    if [[ $shape == gpu ]]; then
        step mistral7b 30 --result "$r/mistral7b.json" \
            "$python" "$tools/mistral7b.py" "${p_common[@]}" --groups 2 \
            --prompt 512 --response-len 256 --reps 2 --budget-s 10 --out "$r/mistral7b.json" ||
            bad=1
    else
        # The 32-layer step at tiny width on contralign-7b's dump (its model, groups and
        # reference), its first loss checked against that run's.
        step mistral7b 30 --result "$r/mistral7b.json" \
            "$python" "$tools/mistral7b.py" "${p_common[@]}" --reps 1 --check "$dump/7b" \
            --out "$r/mistral7b.json" || bad=1
    fi
    local moe=
    if ! has_mode "$c" moe --dump; then
        missing "$r/contralign-moe.json" "bench moe --dump (the MoE layer on the device)"
    else
        moe=1
        step contralign-moe 10 --json "$r/contralign-moe.json" "$c" bench moe \
            --device "$device" "${c_moe[@]}" || bad=1
    fi
    # The baseline runs at every dry run, and on the GPU where contralign's side exists.
    if [[ $shape == gpu && -z $moe ]]; then
        echo '{"skipped": "the MoE baseline runs where bench moe exists"}' >"$r/moe.json"
    else
        step moe 15 --result "$r/moe.json" \
            "$python" "$tools/moe.py" "${p_common[@]}" "${p_moe[@]}" \
            --out "$r/moe.json" || bad=1
    fi
    ((bad == 0))
}

# The carried wheels of $3 (pure Python) unpacked into the folder $2, and at $4 a python
# that is $1 with that folder first on its path: no venv, since the GPU machine's python3 is
# a venv already, and a venv made from one sees its base interpreter's packages, not its
# torch and transformers (a script for `bash -c`, run as a step; no pip needed).
# shellcheck disable=SC2016
trl_site='rm -rf "$2" && mkdir -p "$2" &&
    "$1" -c "import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])" "$2" "$3"/*.whl &&
    printf "#!/bin/sh\nPYTHONPATH=\"%s\${PYTHONPATH:+:\$PYTHONPATH}\" exec \"%s\" \"\$@\"\n" \
        "$2" "$1" >"$4" && chmod +x "$4" &&
    "$4" -c "import trl, datasets, torch; print(\"trl\", trl.__version__, \"from\", trl.__file__)"'

scoreboard() {
    local dir=$1
    begin "$2" 330 10
    unpack "$dir"
    local results trl_python=
    # Global: the exit trap reads it after this function has returned.
    work=$(mktemp -d) || die "mktemp failed"
    results=$work/results
    mkdir -p "$results"
    trap 'rm -rf "$bin" "$work"' EXIT
    # The card, named by the driver: the table says which one ran it even where the
    # baselines' environment probe fails.
    timeout 5 nvidia-smi -L >"$results/gpus.txt" 2>/dev/null || rm -f "$results/gpus.txt"
    if [[ ! -d $dir/wheels ]]; then
        echo "== trl-site: no wheels in $dir (\`$0 prepare $dir\` downloads them)"
    elif step trl-site 10 bash -c "$trl_site" _ python3 "$work/trl-site" "$dir/wheels" \
        "$work/trl-python"; then
        trl_python=$work/trl-python
    else
        echo "== trl-site: TRL did not unpack (trl-site.log): the DPO row runs trl_step.py"
    fi
    rows_of "$bin/contralign" cuda python3 "$trl_python" gpu "$results"
    local rc=$?
    printf '{"steps": [%s]}\n' "$(IFS=,; echo "${steps_json[*]}")" >"$results/steps.json"
    timeout --kill-after=1 4 python3 "$root/tools/scoreboard/report.py" "$results" "$out" \
        "contralign scoreboard, $(date -u '+%Y-%m-%d %H:%M UTC')" >"$logs/report.log" 2>&1 ||
        echo "gpu-suite: report.py failed (report.log)" >&2
    cp -r "$results" "$logs/results"
    finish
    cat "$out/scoreboard.md" 2>/dev/null
    return $rc
}

dry_run() {
    local venv=$root/target/scoreboard-venv out_dir=$root/target/scoreboard-dry-run start
    start=$(now)
    if [[ ! -x $venv/bin/python ]]; then
        echo "gpu-suite: making $venv (PyPI's torch brings its CUDA libraries: minutes, 5 GB)"
        python3 -m venv "$venv" &&
            "$venv/bin/pip" install -q torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 \
                "${wheels[@]:0:2}" safetensors ||
            die "installing the dry run's venv failed"
    fi
    (cd "$root" && cargo build --release --bin contralign) || die "cargo build failed"
    rm -rf "$out_dir"
    limit_scale=4
    begin "$out_dir" $((330 * limit_scale)) 10
    local results=$out_dir/results
    mkdir -p "$results"
    # TRL as the GPU machine gets it: the wheels unpacked beside the python, not installed.
    local trl_python=
    download_wheels "$out_dir/wheels"
    step trl-site 10 bash -c "$trl_site" _ "$venv/bin/python" "$out_dir/trl-site" \
        "$out_dir/wheels" "$out_dir/trl-python" && trl_python=$out_dir/trl-python
    rows_of "$root/target/release/contralign" emu "$venv/bin/python" "$trl_python" tiny \
        "$results"
    local rc=$?
    printf '{"steps": [%s]}\n' "$(IFS=,; echo "${steps_json[*]}")" >"$results/steps.json"
    echo
    "$venv/bin/python" "$root/tools/scoreboard/report.py" "$results" "$out_dir" \
        "contralign scoreboard, dry run at tiny shapes on the CPU (times mean nothing)" || rc=1
    echo "== the dry run's checks (baseline vs contralign on the same data, fp32):"
    grep -h '^check ' "$logs"/*.log
    local mismatches
    mismatches=$(grep -h '^check .*MISMATCH' "$logs"/*.log | wc -l)
    finish
    echo "== scoreboard of the dry run: $out_dir/scoreboard.md; logs: $out_dir/logs.tar.gz"
    echo "== dry run took $(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s"
    if ((mismatches)); then
        echo "gpu-suite: DRY RUN FAILED: $mismatches losses differ from contralign's" >&2
        return 1
    fi
    ((rc == 0)) || { echo "gpu-suite: DRY RUN FAILED: steps failed: ${failed[*]}" >&2; return 1; }
    echo "gpu-suite: dry run passed"
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
    scoreboard)
        (($# == 3)) || usage
        scoreboard "$2" "$3"
        ;;
    dry-run)
        (($# == 1)) || usage
        dry_run
        ;;
    *) usage ;;
esac
