"""``megatron-sz convert``: HF <-> Megatron-Core checkpoints and the logits parity check.

    megatron-sz convert hf-to-mcore HF_DIR OUT_DIR --tp 2 --pp 1
    megatron-sz convert mcore-to-hf CKPT_DIR OUT_DIR
    megatron-sz convert check HF_DIR --tp 2 --pp 1 [--ckpt OUT_DIR] [--tol 1e-4]

``hf-to-mcore`` and ``check`` spawn their tp*pp ranks on this host (gloo on CPU, NCCL
on GPU); under torchrun/srun they use the launcher's ranks instead. ``check`` exits 1
when the max abs logits difference exceeds ``--tol`` and can append its result as one
JSON line to ``--record``.
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron-Core",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="convert_command", metavar="WHAT")

    a = sub.add_parser("hf-to-mcore", help="HF safetensors folder -> Megatron dist checkpoint (loadable at any TP/PP)")
    a.add_argument("hf_dir", help="Hugging Face model folder (config.json + *.safetensors)")
    a.add_argument("out_dir", help="checkpoint root to write (gets iter_0000000/ and `latest`)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to convert with (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks to convert with (default 1)")
    a.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="parameter dtype of the checkpoint (default: the HF config's dtype)")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocab to a multiple of lcm(this, tp) (default 128)")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a.set_defaults(func=_hf_to_mcore)

    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF safetensors shards + config.json")
    b.add_argument("ckpt_dir", help="checkpoint root (follows `latest`) or one iter_* folder")
    b.add_argument("out_dir", help="HF folder to write (must be empty or absent unless --overwrite)")
    b.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the exported tensors (default: the checkpoint's params dtype)")
    b.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size cap in GB (default 5)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.set_defaults(func=_mcore_to_hf)

    c = sub.add_parser("check", help="compare HF and Megatron logits on random full-length sequences")
    c.add_argument("hf_dir", help="Hugging Face model folder (the reference)")
    c.add_argument("--ckpt", default=None,
                   help="converted Megatron checkpoint to test (default: load HF_DIR's weights directly)")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the Megatron side (default 1)")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for the Megatron side (default 1)")
    c.add_argument("--tol", type=float, default=1e-4, help="max abs logits difference allowed (default 1e-4, fp32)")
    c.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default min(max_position_embeddings, 128))")
    c.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    c.add_argument("--seed", type=int, default=0, help="seed for the random token ids (default 0)")
    c.add_argument("--record", default=None, help="append the result as one JSON line to this file")
    c.set_defaults(func=_check)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _hf_to_mcore(args) -> int:
    from megatron_sz.megatron.convert import hf_to_mcore

    path = hf_to_mcore(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
                       make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                       progress=not args.no_progress)
    print(f"wrote Megatron checkpoint {path} (tp={args.tp}, pp={args.pp}; loadable at any TP/PP)")
    return 0


def _mcore_to_hf(args) -> int:
    from megatron_sz.megatron.convert import mcore_to_hf

    out = mcore_to_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype, max_shard_size_gb=args.max_shard_size_gb,
                      progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote Hugging Face model {out}")
    return 0


def _check(args) -> int:
    from megatron_sz.megatron.convert import check

    res = check(args.hf_dir, tp=args.tp, pp=args.pp, tol=args.tol, ckpt=args.ckpt, seq_len=args.seq_len,
                batch=args.batch, seed=args.seed)
    verdict = "OK" if res["ok"] else "FAIL"
    print(f"{verdict}: max abs logits diff {res['max_abs_diff']:.3e} (tol {args.tol:.1e}; mean "
          f"{res['mean_abs_diff']:.3e}; |logits| up to {res['ref_max_abs_logit']:.3g}; argmax agreement "
          f"{res['argmax_agreement']:.4f}) model_type={res['model_type']} tp={args.tp} pp={args.pp} "
          f"batch={res['batch']} seq_len={res['seq_len']}")
    if args.record:
        from pathlib import Path

        path = Path(args.record)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(res) + "\n")
    return 0 if res["ok"] else 1
