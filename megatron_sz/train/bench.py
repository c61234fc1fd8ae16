"""Throughput benchmark of a training job: tokens/s and MFU of solver-dpo (or another job).

    python -m megatron_sz.train.bench --model qwen3-1.7b --seq 2048 --steps 20   # one GPU, bf16
    torchrun --nproc-per-node 8 -m megatron_sz.train.bench --model qwen3-8b --tp 2 ...
    python -m megatron_sz.train.bench --model tiny --seq 64 --steps 10           # CPU smoke

It builds a randomly initialised Qwen3-shaped model from a config (no download), writes
synthetic preference pairs whose chosen/rejected completions fill ``--seq`` tokens, runs
the real job (``run_job``: reference pass, Megatron schedule, fused DPO loss, optimizer)
and appends one CSV row per run to ``--csv``: job, model, layout, seq, micro/global batch,
median step time, tokens/s, MFU (model FLOPs, see ``metrics.model_flops_per_token``),
device, date. Steps after the first ``--warmup`` are timed.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import random
import statistics
import tempfile
from pathlib import Path

MODELS = {
    # Qwen3-1.7B / 8B shapes (public config.json values).
    "qwen3-1.7b": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936, tie=True),
    "qwen3-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=12288, vocab=151936, tie=False),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=None, tie=True),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megatron_sz.train.jobs import JOBS

    ap.add_argument("--job", default="solver-dpo", choices=list(JOBS), help="which training job to time")
    ap.add_argument("--model", default="qwen3-1.7b", choices=sorted(MODELS), help="model shape")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (prompt + completion)")
    ap.add_argument("--micro-batch", type=int, default=1, help="items per micro-batch (a DPO item is a pair)")
    ap.add_argument("--global-batch", type=int, default=8, help="items per optimizer step")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps to run")
    ap.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"], help="activation recompute")
    ap.add_argument("--lengths", default="fixed", choices=["fixed", "mixed"],
                    help="fixed: every completion fills --seq; mixed: completion lengths drawn from a "
                         "log-normal (median --seq/8, capped at --seq/2), like real SFT/DPO data")
    ap.add_argument("--batching", default="length_sorted", choices=["length_sorted", "packed"],
                    help="the job's train.batching (packed: several sequences per row)")
    ap.add_argument("--label", default="", help="free text stored in the CSV row (e.g. an A/B arm)")
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--csv", default="train_bench.csv", help="CSV file the result row is appended to")
    args = ap.parse_args(argv)

    import torch

    from megatron_sz.data import write_jsonl
    from megatron_sz.train import testing as T
    from megatron_sz.train.jobs import run_job

    work = Path(args.out or tempfile.mkdtemp(prefix="msz-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = T.make_tokenizer(work / "tok")
    shape = dict(MODELS[args.model])
    vocab = shape.pop("vocab") or tok.vocab_size
    tie = shape.pop("tie")
    cfg = T.tiny_config(vocab, tie=tie, max_pos=max(4096, args.seq), **shape)
    rng = random.Random(0)
    # Digits are single tokens in the fixture tokenizer: n digits ~ n tokens.
    half = max(4, args.seq // 2 - 8)

    def digits(n):
        return "".join(rng.choice("0123456789") for _ in range(n))

    def length():
        if args.lengths == "fixed":
            return half
        return max(4, min(half, int(rng.lognormvariate(math.log(max(4, args.seq // 8)), 0.8))))

    n_items = args.global_batch * args.steps
    recs = [JOBS[args.job].synthetic(lambda: digits(length()), i) for i in range(n_items)]
    data = work / "data.jsonl"
    write_jsonl(data, recs)
    train = {"max_length": args.seq, "micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch,
             "export_hf": False, "pad_to_multiple_of": 64, "optim": {"lr": 1e-5}, "batching": args.batching}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    job = JOBS[args.job]
    recipe = T.write_recipe(work / "bench.yaml", config=cfg, tokenizer=str(work / "tok"), sections={
        "device": "auto", job.role: {"model": {"dtype": "bf16"}, "parallel": {"tp": args.tp, "pp": args.pp,
                                     "gpus_per_node": world, "recompute": args.recompute}, job.section: train}})
    res = run_job(args.job, str(recipe), data, None, work / "run")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r.get("type") == "train" and r["step"] > args.warmup]
    if not timed:
        print("no timed steps: raise --steps above --warmup")
        return 1
    step_s = statistics.median(r["step_time_s"] for r in timed)
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    mfu = statistics.median(mfus) if mfus else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    row = {"job": args.job, "model": args.model, "tp": args.tp, "pp": args.pp, "dp": res.summary["layout"]["dp"],
           "seq": args.seq, "micro_batch": args.micro_batch, "global_batch": args.global_batch,
           "recompute": args.recompute, "lengths": args.lengths, "batching": args.batching,
           "label": args.label, "step_s_p50": round(step_s, 4), "tokens_per_s_p50": round(tps, 1),
           "mfu_p50": None if mfu is None else round(mfu, 4), "device": device,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    new = not Path(args.csv).exists()
    with open(args.csv, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
