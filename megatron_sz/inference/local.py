"""Local CPU backend: an HF checkpoint folder run with transformers, batched, with a KV cache.

For tiny models (the embedded default's ~1M-parameter solver) and tests. What is unusual:

* **Sampling is deterministic per sample, not per batch.** Each (request id, sample
  index) row gets its own ``torch.Generator`` seeded from ``sampling.seed`` (or the
  backend seed), the request id and the sample index; a token is drawn by the Gumbel-max
  trick with that row's noise. The same row therefore gives the same text whatever
  batch, shard or order it lands in (up to fp32 round-off in the logits), so
  SLURM array shards are reproducible and reruns agree with the first run.
* Rows are sorted by prompt length and left-padded, so a batch wastes little padding;
  finished rows are dropped from the batch and the KV cache as soon as they hit EOS, a
  stop string or ``max_tokens``.
* fp32 on CPU always (bf16 matmuls on CPU are slow and inexact).
* Small models decode with **one intra-op thread** (``threads=None`` picks 1 below 20M
  parameters, restored afterwards). Measured on the 2-core dev machine with other jobs
  running: the 0.8M-parameter tiny-cpu model, 64 rows x 32 tokens, took 19.0 s with
  torch's default 2 OpenMP threads and 0.43 s with 1 (44x): [64, 128] matmuls gain
  nothing from a second thread, and OpenMP spin-waiting collapses when cores are shared.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sz.errors import UserError
from megatron_sz.inference.base import (GenerationRequest, GenerationResult, InferenceBackend,
                                        OnResult, check_unique_ids, stable_seed)

log = logging.getLogger("megatron_sz.inference.local")


@dataclass
class _Row:
    req_index: int
    sample_index: int
    prompt_ids: list[int]
    seed: int
    temperature: float
    top_p: float
    max_new: int
    stop: list[str]


class LocalBackend(InferenceBackend):
    """transformers ``AutoModelForCausalLM`` on CPU (or one GPU if ``device='cuda'``)."""

    name = "local"

    def __init__(self, model_path: str | Path, *, tokenizer_path: str | Path | None = None,
                 seed: int = 0, batch_size: int = 32, device: str = "cpu", add_bos: bool | None = None,
                 threads: int | None = None, model: Any = None, tokenizer: Any = None):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM

        from megatron_sz.tokenizer import load_tokenizer

        self.model_path = str(model_path)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        if model is None:
            mp = Path(model_path)
            if not (mp / "config.json").is_file():
                raise UserError(f"no HF checkpoint at {mp} (config.json missing)", where=str(mp),
                                fix="point the local backend at an HF folder (config.json + safetensors)")
            model = AutoModelForCausalLM.from_pretrained(str(mp), dtype=torch.float32)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer or load_tokenizer(tokenizer_path or model_path)
        # None (the default): prepend BOS exactly when the trainer does, i.e. whenever the
        # tokenizer has one (train/data.encode_example), so every caller (rounds, eval,
        # generate) samples from the distribution the model was trained on.
        self.add_bos = (self.tokenizer.bos_id is not None) if add_bos is None else bool(add_bos)
        eos = {int(self.tokenizer.eos_id)}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(int(e) for e in gen_eos)
        self.eos_ids = sorted(eos)
        self.pad_id = int(self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id)
        self.true_vocab = int(self.tokenizer.vocab_size)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.threads = threads if threads is not None else (1 if n_params < 20_000_000 else None)
        self.stats = {"requests": 0, "samples": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "forward_passes": 0, "seconds": 0.0}

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        text = prompt if isinstance(prompt, str) else self.tokenizer.format_chat(prompt)
        return list(self.tokenizer.encode(text, bos=self.add_bos))

    # ------------------------------------------------------------------ generate

    def generate(self, requests: list[GenerationRequest], *, progress: bool = True,
                 on_result: OnResult | None = None) -> list[GenerationResult]:
        import torch

        if self.threads is None or self.device.type != "cpu":
            return self._generate(requests, progress, on_result)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._generate(requests, progress, on_result)
        finally:
            torch.set_num_threads(before)

    def _generate(self, requests: list[GenerationRequest], progress: bool,
                  on_result: OnResult | None) -> list[GenerationResult]:
        check_unique_ids(requests)
        t0 = time.time()
        rows: list[_Row] = []
        for ri, req in enumerate(requests):
            ids = self.encode_prompt(req.prompt)
            if len(ids) >= self.max_positions:
                log.warning("request %s: prompt of %d tokens exceeds the model's %d positions; "
                            "keeping the last %d", req.id, len(ids), self.max_positions, self.max_positions - 1)
                ids = ids[-(self.max_positions - 1):]
            if not ids:
                ids = [self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.pad_id]
            max_new = min(req.sampling.max_tokens, self.max_positions - len(ids))
            base_seed = req.sampling.seed if req.sampling.seed is not None else self.seed
            for j in range(req.n):
                rows.append(_Row(ri, j, ids, stable_seed("local", base_seed, req.id, j),
                                 float(req.sampling.temperature), float(req.sampling.top_p),
                                 max_new, list(req.sampling.stop)))
        # Longest prompts first: the first batch shows the worst-case memory right away.
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].prompt_ids), i))
        texts: list[list[str | None]] = [[None] * r.n for r in requests]
        reasons: list[list[str | None]] = [[None] * r.n for r in requests]
        remaining = [r.n for r in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = _progress(len(rows), progress, "local generate")
        for start in range(0, len(order), self.batch_size):
            batch = [rows[i] for i in order[start:start + self.batch_size]]
            outs = self._generate_batch(batch)
            for row, (text, reason) in zip(batch, outs):
                texts[row.req_index][row.sample_index] = text
                reasons[row.req_index][row.sample_index] = reason
                remaining[row.req_index] -= 1
                if remaining[row.req_index] == 0:
                    req = requests[row.req_index]
                    res = GenerationResult(id=req.id, texts=list(texts[row.req_index]),  # type: ignore[arg-type]
                                           finish_reasons=list(reasons[row.req_index]),  # type: ignore[arg-type]
                                           meta={**req.meta, "backend": "local"})
                    results[row.req_index] = res
                    self._emit(on_result, res)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        self.stats["requests"] += len(requests)
        self.stats["samples"] += len(rows)
        self.stats["seconds"] = round(self.stats["seconds"] + time.time() - t0, 3)
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[_Row]) -> list[tuple[str, str]]:
        import torch

        dev = self.device
        B = len(batch)
        L = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attn[b, L - len(r.prompt_ids):] = 1
        self.stats["prompt_tokens"] += int(attn.sum())
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        gens = [torch.Generator().manual_seed(r.seed) for r in batch]
        temps = torch.tensor([r.temperature for r in batch], dtype=torch.float32)
        top_ps = torch.tensor([r.top_p for r in batch], dtype=torch.float32)
        eos = torch.tensor(self.eos_ids, dtype=torch.long)
        generated: list[list[int]] = [[] for _ in batch]
        outputs: list[tuple[str, str] | None] = [None] * B
        active = list(range(B))  # batch rows still generating, in cache order
        ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
        past = None
        with torch.inference_mode():
            while active:
                out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                                 past_key_values=past, use_cache=True, logits_to_keep=1)
                self.stats["forward_passes"] += 1
                past = out.past_key_values
                logits = out.logits[:, -1, :].float().cpu()
                idx = torch.tensor(active)
                tok = _sample(logits, temps[idx], top_ps[idx], [gens[i] for i in active], self.true_vocab)
                keep: list[int] = []
                for k, b in enumerate(active):
                    t = int(tok[k])
                    row = batch[b]
                    if bool((eos == t).any()):
                        outputs[b] = (self._decode(generated[b]), "stop")
                        continue
                    generated[b].append(t)
                    self.stats["generated_tokens"] += 1
                    if row.stop:
                        text = self._decode(generated[b])
                        cut = _first_stop(text, row.stop)
                        if cut is not None:
                            outputs[b] = (text[:cut], "stop")
                            continue
                    if len(generated[b]) >= row.max_new:
                        outputs[b] = (self._decode(generated[b]), "length")
                        continue
                    keep.append(k)
                if not keep:
                    break
                new_active = [active[k] for k in keep]
                keep_t = torch.tensor(keep, device=dev)
                if len(keep) < len(active):
                    past.batch_select_indices(keep_t)
                    attn = attn[keep_t]
                    pos = pos[keep_t]
                last = torch.tensor([generated[b][-1] for b in new_active], dtype=torch.long, device=dev)
                ids = last[:, None]
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                active = new_active
        return outputs  # type: ignore[return-value]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def close(self) -> None:
        self.model = None


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _sample(logits, temps, top_ps, gens, true_vocab: int):
    """One token per row: greedy where temperature == 0, else Gumbel-max over the
    temperature-scaled, top-p-filtered distribution, with each row's own generator."""
    import torch

    V = logits.shape[-1]
    if true_vocab < V:  # padded vocab rows are never sampled
        logits[:, true_vocab:] = float("-inf")
    greedy = temps <= 0
    scaled = logits / temps.clamp_min(1e-6)[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    if bool((top_ps < 1).any()):
        sorted_lp, sorted_idx = logp.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        cum = probs.cumsum(-1)
        drop = (cum - probs) > top_ps[:, None]
        sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, sorted_idx, sorted_lp)
    noise = torch.stack([torch.rand(V, generator=g) for g in gens])
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
    sampled = (logp + gumbel).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="sample", mininterval=2.0, leave=False)
