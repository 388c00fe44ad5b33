"""Builds scoreboard.md and scoreboard.json from the JSON results the GPU suite's scoreboard
(or dry-run) steps left in one folder: NAME.json from each contralign bench and baseline,
or {"missing": why} / {"skipped": why} / {"failed": why} where a step gave none.

Ratios are the baseline's time over contralign's (above 1: contralign is faster) and
contralign's tokens/s over the baseline's.

usage: report.py RESULTS_DIR OUT_DIR TITLE
"""

import json
import os
import sys

H100_PEAK_TFLOPS = 989.0  # as src/engine/bench.rs
MEMORY_NOTE = ("extra memory beyond h, head, dh and dW: contralign's as planned (its logits "
               "chunk and statistics), the baseline's measured (peak less inputs and gradients)")


def load(dir, name):
    path = os.path.join(dir, f"{name}.json")
    if not os.path.exists(path):
        return {"missing": f"no result ({name}.json)"}
    try:
        return json.load(open(path))
    except json.JSONDecodeError as e:
        return {"failed": f"{name}.json is not JSON: {e}"}


def absent(r):
    """Why a result has no figures, or None."""
    for key in ("missing", "skipped", "failed", "out_of_memory"):
        if key in r:
            return f"{key.replace('_', ' ')}: {r[key]}"
    return None


def gib(b):
    return "—" if b is None else f"{b / 2**30:.2f} GiB"


def size(b):
    """Bytes in GiB, or in MiB below one GiB (the dry run's tiny shapes)."""
    return gib(b) if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, unit=""):
    if x is None:
        return "—"
    return f"{x:.3g}{unit}"


def row(name, what, ours, theirs, r, note=""):
    return {"row": name, "measure": what, "contralign": ours, "baseline": theirs,
            "ratio": r, "note": note}


def scoring_rows(c, b):
    why_c, why_b = absent(c), absent(b)
    note = "; ".join(w for w in (why_c and f"contralign {why_c}",
                                 why_b and f"baseline {why_b}") if w)
    cf = None if why_c else c
    bf = None if why_b else b
    get = lambda d, k: None if d is None else d.get(k)  # noqa: E731
    out = []
    for what, ck, bk in (("forward (ms)", "fused_forward_s", "forward_s"),
                         ("forward + backward (ms)", "fused_forward_backward_s",
                          "forward_backward_s")):
        ours, theirs = get(cf, ck), get(bf, bk)
        out.append(row("scoring + loss", what, ours and ours * 1e3, theirs and theirs * 1e3,
                       ratio(theirs, ours), note))
    # Both sides count the memory beyond the inputs (h, head) and the outputs (dh, dW).
    memory_note = "; ".join(w for w in (note, MEMORY_NOTE) if w)
    out.append(row("scoring + loss", "extra memory (GiB)",
                   get(cf, "fused_extra_bytes") and cf["fused_extra_bytes"] / 2**30,
                   get(bf, "extra_bytes") and bf["extra_bytes"] / 2**30,
                   ratio(get(bf, "extra_bytes"), get(cf, "fused_extra_bytes")), memory_note))
    return out


def mask_name(case):
    """contralign writes "causal" or {"packed": {...}}, the baseline "causal" or "packed"."""
    m = case["mask"]
    return m if isinstance(m, str) else next(iter(m))


def attention_rows(ours_by_mask, b):
    """A row pair (forward, backward) per (mask, tokens) case either side ran, matched by
    mask and the stream's token count; ours_by_mask: contralign's result per mask (one bench
    step each). A case one side lacks says why: its step gave no figures, or it has no such
    case. A mask neither side has a case of still gets a row pair saying why."""
    why_b = absent(b)
    theirs = {} if why_b else {(x["mask"], x["tokens"]): x for x in b.get("cases", [])}
    ours, why_c = {}, {}
    for mask, c in ours_by_mask.items():
        why_c[mask] = absent(c)
        if not why_c[mask]:
            ours.update({(mask_name(x), x["tokens"]): x for x in c.get("cases", [])})
    keys = list(ours) + [k for k in theirs if k not in ours]
    out = []
    for mask in ours_by_mask:
        mine = [k for k in keys if k[0] == mask] or [(mask, None)]
        for key in mine:
            cc, bc = ours.get(key), theirs.get(key)
            case = f"{mask} {key[1]}" if key[1] else mask
            lacks = f"has no {case}-token case" if key[1] else f"has no {mask} case"
            notes = []
            if not cc:
                notes.append(f"contralign {why_c[mask] or lacks}")
            if not bc:
                notes.append(f"baseline {why_b or lacks}")
            if bc and mask == "packed":
                notes.append(f"SDPA as {bc['sequences']} sequences of {bc['sequence_len']}")
            for what in ("forward", "backward"):
                k = f"{what}_ms"
                mine_ms, their_ms = cc and cc[k], bc and bc[k]
                out.append(row(f"attention, {case}", f"{what} (ms)", mine_ms, their_ms,
                               ratio(their_ms, mine_ms), "; ".join(notes)))
    return out


def step_rows(name, c, b, gemm_tflops):
    why_c, why_b = absent(c), absent(b)
    note = "; ".join(w for w in (why_c and f"contralign {why_c}",
                                 why_b and f"baseline {why_b}") if w)
    if not why_b:
        note = (note + "; " if note else "") + f"baseline: {b['baseline']}, " \
            f"{b['layers']} layers, {b['stream_tokens']} tokens/step"
    if not why_c:
        note = (note + "; " if note else "") + f"contralign: {c['precision']} engine, " \
            f"{c['layers']} layers, {c['tokens_per_step']} tokens/step"
        if c.get("device_used_bytes") and c.get("plan_bytes"):
            note += f", memory measured {c['device_used_bytes'] / 2**30:.2f} GiB against " \
                f"{c['plan_bytes'] / 2**30:.2f} GiB planned " \
                f"({c['device_used_bytes'] / c['plan_bytes']:.3f} of the plan)"
        if c.get("workspace_peak_bytes") and c.get("workspace_plan_bytes"):
            # The pool's high-water mark: how much of the plan's activations, workspace,
            # logits and batch categories a step used, on any device.
            note += f", workspace used {size(c['workspace_peak_bytes'])} of " \
                f"{size(c['workspace_plan_bytes'])} planned " \
                f"({c['workspace_peak_bytes'] / c['workspace_plan_bytes']:.3f})"
    ours = None if why_c else c["tokens_per_s"]
    theirs = None if why_b else b["tokens_per_s"]
    out = [row(name, "tokens/s", ours, theirs, ratio(ours, theirs), note),
           row(name, "peak memory (GiB)",
               None if why_c else (c.get("device_used_bytes") or c["device_bytes"]) / 2**30,
               None if why_b or b.get("peak_bytes") is None else b["peak_bytes"] / 2**30,
               None, note)]
    for label, peak in (("MFU vs 989 TFLOP/s", H100_PEAK_TFLOPS),
                        ("MFU vs measured GEMM", gemm_tflops)):
        mfu = lambda r: None if absent(r) or not peak else \
            r.get("model_tflop_per_step") / r["seconds_per_step"] / peak  # noqa: E731
        out.append(row(name, label, mfu(c), mfu(b), None, note))
    return out


def moe_rows(c, b):
    """contralign's side is `bench moe`'s "case": its forward, and its forward plus its
    backward (timed apart there) against the baseline's forward + backward."""
    why_c, why_b = absent(c), absent(b)
    note = "; ".join(w for w in (why_c and f"contralign {why_c}",
                                 why_b and f"baseline {why_b}") if w)
    if not why_b:
        note = (note + "; " if note else "") + f"baseline: {b['baseline']}, {b['tokens']} tokens"
    case = None if why_c else c.get("case")
    if not why_c and not (case and "forward_ms" in case and "backward_ms" in case):
        note += f"; contralign printed {json.dumps(c)[:300]}"
        case = None
    elif case:
        note += f"; contralign {case.get('dtype')}, {case.get('tokens')} tokens"
    ours = {} if not case else {
        "forward_ms": case["forward_ms"],
        "forward_backward_ms": case["forward_ms"] + case["backward_ms"],
    }
    out = []
    for what in ("forward_ms", "forward_backward_ms"):
        theirs = None if why_b else b[what]
        out.append(row("MoE layer (Mixtral-8x7B)", what.replace("_ms", " (ms)").replace(
            "_", " + "), ours.get(what), theirs, ratio(theirs, ours.get(what)), note))
    return out


CONTRALIGN_RESULTS = ("contralign-scoring", "contralign-attention-causal",
                      "contralign-attention-packed", "contralign-dpo", "contralign-nca",
                      "contralign-7b", "contralign-moe")


def contralign_devices(results):
    """The devices contralign's results name (its benches print `device`)."""
    found = (load(results, name) for name in CONTRALIGN_RESULTS)
    return sorted({r["device"] for r in found if not absent(r) and "device" in r})


def listed_gpus(results):
    """`nvidia-smi -L` as the scoreboard recorded it, or None."""
    path = os.path.join(results, "gpus.txt")
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    return "; ".join(text.splitlines()) or None


def markdown(title, env, rows, steps, gpus=None, devices=()):
    lines = [f"# {title}", ""]
    # Which card ran the rows, whatever became of the baselines' environment probe.
    if gpus:
        lines.append(f"nvidia-smi -L: {gpus}.")
    lines.append(f"contralign ran on: {', '.join(devices) or 'no result names a device'}.")
    if absent(env):
        lines.append(f"Environment: {absent(env)}")
    else:
        lines += [f"GPU: {env['gpu']}; driver {env['driver']}; CUDA {env['cuda']}; "
                  f"PyTorch {env['torch']}; transformers {env['transformers']}.",
                  f"Measured: copy {env['copy_gb_s']:.0f} GB/s (bytes read + written), "
                  f"bf16 GEMM {env['gemm_tflops']:.0f} TFLOP/s at {env['gemm_size']}³."]
    lines += ["", "Ratio: the baseline's time over contralign's, or contralign's tokens/s "
              "over the baseline's (above 1: contralign ahead).", "",
              "| row | measure | contralign | baseline | ratio | note |",
              "|:--|:--|--:|--:|--:|:--|"]
    said = None
    for r in rows:
        # A row's note once, on its first measure.
        note = "" if (r["row"], r["note"]) == said else r["note"]
        said = (r["row"], r["note"])
        lines.append(f"| {r['row']} | {r['measure']} | {fmt(r['contralign'])} | "
                     f"{fmt(r['baseline'])} | {fmt(r['ratio'], '×')} | {note} |")
    if steps:
        lines += ["", "| step | exit | time (s) | limit (s) |", "|:--|:--|--:|--:|"]
        lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} | {s['limit']} |"
                  for s in steps]
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1])
    results, out, title = sys.argv[1:]
    env = load(results, "env")
    gemm = None if absent(env) else env["gemm_tflops"]
    rows = scoring_rows(load(results, "contralign-scoring"), load(results, "scoring"))
    # contralign's attention runs once per mask (the cases the baseline times in one
    # process); rows per (mask, tokens) case.
    rows += attention_rows({m: load(results, f"contralign-attention-{m}")
                            for m in ("causal", "packed")}, load(results, "attention"))
    # Both DPO baselines have a row: TRL's own DPOTrainer, and its reproduction
    # (trl_step.py), which runs on the GPU only where TRL failed and in every dry run; a
    # baseline that did not run says why.
    dpo = load(results, "contralign-dpo")
    rows += step_rows("DPO step vs TRL DPOTrainer", dpo, load(results, "trl-dpo"), gemm)
    rows += step_rows("DPO step vs trl_step.py", dpo, load(results, "trl-step"), gemm)
    rows += step_rows("NCA step, K = 4", load(results, "contralign-nca"),
                      load(results, "nca"), gemm)
    rows += step_rows("Mistral-7B, 32 layers, 80 GB", load(results, "contralign-7b"),
                      load(results, "mistral7b"), gemm)
    rows += moe_rows(load(results, "contralign-moe"), load(results, "moe"))
    steps = load(results, "steps")
    steps = [] if absent(steps) else steps["steps"]
    gpus, devices = listed_gpus(results), contralign_devices(results)
    board = {"title": title, "gpus": gpus, "contralign_devices": devices, "environment": env,
             "rows": rows, "steps": steps}
    with open(os.path.join(out, "scoreboard.json"), "w") as f:
        json.dump(board, f, indent=2)
    text = markdown(title, env, rows, steps, gpus, devices)
    with open(os.path.join(out, "scoreboard.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
