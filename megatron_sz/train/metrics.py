"""Progress lines, metrics.jsonl, wandb, and model FLOPs / MFU.

* One line per logged step on stdout: step, loss, (DPO reward margin and accuracy),
  grad norm, lr, tokens/s, MFU, ETA. The same record goes to ``metrics.jsonl`` (one
  JSON object per line, flushed) and to wandb.
* wandb runs **offline by default** (files under the output dir, ``wandb sync`` later);
  online only when the recipe names a ``wandb.project``; ``mode: disabled`` turns it off.
  The run id is kept in the output dir so a resumed job continues the same wandb run.
* On resume, lines of steps after the checkpoint (trained again after a crash) are cut
  from ``metrics.jsonl`` first, so the file has exactly one line per step.
* MFU counts model FLOPs (not hardware FLOPs): 6 x matmul parameters per token for
  forward+backward, plus 12 x layers x hidden x sequence for attention scores, plus the
  LM head. The peak comes from ``MEGATRON_SZ_PEAK_TFLOPS`` or a table of dense bf16
  peaks by GPU name; on CPU it is unknown and MFU is reported as null.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from megatron_sz.data import atomic_write_text

# Dense bf16 tensor-core peaks (TFLOP/s) from vendor data sheets, without sparsity.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "B200": 2250.0, "MI300X": 1307.0, "MI308X": 1307.0,
               "MI250X": 383.0}


def model_flops_per_token(hf_config: dict, seq_len: float, *, backward: bool = True) -> float:
    """Model FLOPs per token of a dense decoder (Qwen/Llama shape)."""
    h = hf_config["hidden_size"]
    layers = hf_config["num_hidden_layers"]
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads", heads)
    head_dim = hf_config.get("head_dim") or h // heads
    ffn = hf_config["intermediate_size"]
    vocab = hf_config["vocab_size"]
    per_layer = h * head_dim * (heads + 2 * kv) + heads * head_dim * h + 3 * h * ffn
    matmul_params = layers * per_layer + h * vocab
    fwd = 2 * matmul_params + 2 * 2 * layers * heads * head_dim * seq_len  # QK^T and AV
    return fwd * (3 if backward else 1)


def peak_flops() -> float | None:
    env = os.environ.get("MEGATRON_SZ_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name().upper()
    except Exception:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Rank-0 logger. ``log(record)`` prints a line and appends to metrics.jsonl/wandb."""

    def __init__(self, out_dir: str | Path, *, kind: str, total_steps: int, start_step: int,
                 enabled: bool = True, wandb_spec: Any = None, config: dict | None = None,
                 stream: Any = None):
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.path = self.out_dir / "metrics.jsonl"
        self._t0 = time.perf_counter()
        self._steps_timed = 0
        self._time_timed = 0.0
        self._wandb = None
        self._fh = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self._wandb = _start_wandb(self.out_dir, kind=kind, spec=wandb_spec, config=config)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial last line from a killed writer
            if rec.get("type") == "train" and rec.get("step", 0) > step:
                continue
            keep.append(line + "\n")
        atomic_write_text(self.path, "".join(keep))

    def step_time(self, seconds: float) -> None:
        self._steps_timed += 1
        self._time_timed += seconds

    def eta(self, step: int) -> float:
        per = self._time_timed / max(1, self._steps_timed)
        return per * max(0, self.total_steps - step)

    def log(self, record: dict, *, line: bool = True) -> None:
        if not self.enabled:
            return
        record = {"type": "train", "kind": self.kind, **record, "time": round(time.time(), 3)}
        self._fh.write(json.dumps(record, default=_jsonable) + "\n")
        self._fh.flush()
        if line:
            print(format_line(record, total=self.total_steps), file=self.stream, flush=True)
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                step=int(record.get("step", 0)))
            except Exception as exc:  # never let logging kill training
                print(f"[train] wandb log failed: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:
                pass
            self._wandb = None


def _jsonable(v: Any) -> Any:
    try:
        return float(v)
    except Exception:
        return str(v)


def format_line(rec: dict, *, total: int) -> str:
    t = rec.get("type", "train")
    if t == "eval":
        parts = [f"[{rec.get('kind')}] eval step {rec.get('step')}"]
        for k, v in rec.items():
            if k.startswith("eval_") and isinstance(v, float):
                parts.append(f"{k[5:]} {v:.4f}")
        return " | ".join(parts)
    parts = [f"[{rec.get('kind')}] step {rec['step']}/{total}", f"loss {rec['loss']:.4f}"]
    if "margin" in rec:
        parts.append(f"margin {rec['margin']:.3f}")
    if "accuracy" in rec:
        parts.append(f"acc {rec['accuracy']:.3f}")
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    parts.append(f"lr {rec['lr']:.2e}")
    parts.append(f"tok/s {rec['tokens_per_s']:.0f}")
    parts.append("mfu " + (f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "n/a"))
    parts.append(f"eta {fmt_eta(rec.get('eta_s', 0.0))}")
    return " | ".join(parts)


def _start_wandb(out_dir: Path, *, kind: str, spec: Any, config: dict | None) -> Any:
    mode = getattr(spec, "mode", "offline") if spec is not None else "offline"
    project = getattr(spec, "project", None) if spec is not None else None
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if project is None:
        mode = "offline"  # never online without a named project
    elif mode == "offline" and os.environ.get("WANDB_MODE") != "offline":
        mode = "online"  # naming a project is how a recipe asks for online logging
    try:
        import wandb
    except ImportError:
        return None
    id_file = out_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    try:
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]
            atomic_write_text(id_file, run_id + "\n")
        return wandb.init(project=project or "megatron-sz", entity=getattr(spec, "entity", None),
                          name=f"{out_dir.name}-{kind}", id=run_id, resume="allow", mode=mode,
                          dir=str(out_dir), config=config or {}, reinit="finish_previous")
    except Exception as exc:
        print(f"[train] wandb disabled ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
