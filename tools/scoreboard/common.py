"""Helpers the scoreboard's PyTorch baselines share: the device, timing, peak memory, the
dumps `contralign bench ... --dump DIR` writes, and the fp32 agreement check of the dry run.

Every baseline prints one JSON object (and writes it to --out): the GPU suite's report.py
reads them into scoreboard.md and scoreboard.json (docs/cuda.md, "The scoreboard").
"""

import argparse
import json
import sys
import time

import torch

# The dry run's agreement bound: the baselines' losses equal contralign's to this relative
# error in fp32 (issue 16). Both sides sum a few thousand fp32 log-probs of size ~5: their
# rounding differs by about 1e-6 relative, so 1e-4 only fails on a different computation.
RELATIVE_BOUND = 1e-4


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions at most")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="stop timing once this many seconds have gone (at least one rep runs)")
    p.add_argument("--check", metavar="DIR",
                   help="a contralign --dump folder: recompute its loss in fp32 and compare")
    p.add_argument("--out", help="also write the JSON result here")
    return p


def dtype_of(name):
    return torch.bfloat16 if name == "bf16" else torch.float32


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(run, device, reps, budget_s, started=None):
    """Median seconds of up to `reps` synchronized runs of `run` after one warm-up, fewer when
    `budget_s` (counted from `started`, default now) runs out; returns (median, reps run)."""
    started = time.perf_counter() if started is None else started
    run()
    sync(device)
    times = []
    while len(times) < max(reps, 1):
        t = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - started > budget_s:
            break
    times.sort()
    return times[len(times) // 2], len(times)


def reset_peak(device):
    """Bytes allocated now, the floor the peak's extra is measured from (0 on the CPU)."""
    if torch.device(device).type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_bytes(device):
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def compare(name, ours, theirs):
    """Prints the fp32 agreement of a baseline's loss with contralign's; False past the bound."""
    rel = abs(ours - theirs) / max(abs(theirs), 1e-30)
    ok = rel <= RELATIVE_BOUND
    verdict = "ok" if ok else f"MISMATCH (bound {RELATIVE_BOUND:g})"
    print(f"check {name}: baseline {ours:.9g} contralign {theirs:.9g} "
          f"relative {rel:.2e} {verdict}", file=sys.stderr)
    return {"baseline_loss": ours, "contralign_loss": theirs, "relative": rel, "ok": ok}


def bounded(name, rel):
    """Prints a relative difference of other outputs than the loss, held to the same bound."""
    ok = rel <= RELATIVE_BOUND
    print(f"check {name}: relative difference {rel:.2e} "
          f"{'ok' if ok else f'MISMATCH (bound {RELATIVE_BOUND:g})'}", file=sys.stderr)
    return {"relative": rel, "ok": ok}


def emit(result, out):
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    if result.get("check") and not all(c["ok"] for c in result["check"].values()):
        sys.exit(f"{result.get('row', 'baseline')}: loss differs from contralign's")
