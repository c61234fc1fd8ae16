"""vLLM offline batch backend: ``vllm.LLM`` on the teacher partition's GPUs (CUDA or ROCm).

This is the SLURM-native path: a teacher array task reads a request shard from the
shared filesystem, runs it through ``vllm.LLM`` with tensor parallelism from the
recipe, and appends results through the same shard code as every other backend
(``base.run_request_shard``). No network link between partitions is needed.

The only module in megatron-sz that imports vllm, and only inside ``VLLMBackend``,
so CPU installs never need it. Requests are run in chunks of ``chunk_size``: vLLM
batches a chunk internally (continuous batching), and each finished chunk is handed to
``on_result`` at once, so a preempted job loses at most one chunk.

Sampling: ``SamplingParams(n, temperature, top_p, max_tokens, seed, stop)`` per request.
A per-request seed is derived from ``sampling.seed`` (or the backend seed) and the
request id, so a rerun of a shard reproduces its samples whatever the chunking.
Chat prompts are rendered with the model's chat template (``llm.get_tokenizer()``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_sz.errors import UserError
from megatron_sz.inference.base import (GenerationRequest, GenerationResult, InferenceBackend,
                                        OnResult, check_unique_ids, stable_seed)

log = logging.getLogger("megatron_sz.inference.vllm")


def vllm_available() -> tuple[bool, str]:
    """(True, "") if vllm imports and a GPU is visible, else (False, reason)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken CUDA install
        return False, f"vllm is not importable ({type(exc).__name__}: {exc}); install megatron-sz[gpu]"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no GPU visible (torch.cuda.is_available() is False)"
    except ImportError:
        return False, "torch is not installed"
    return True, ""


class VLLMBackend(InferenceBackend):
    name = "vllm"

    def __init__(self, model_path: str | Path, *, tokenizer_path: str | Path | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 chunk_size: int = 512, **llm_kwargs):
        super().__init__()
        ok, why = vllm_available()
        if not ok:
            raise UserError(f"the vllm backend cannot start: {why}", where="backend.kind",
                            fix="run on a GPU node with vllm installed, or use kind: openai / local")
        from vllm import LLM

        kwargs = dict(model=str(model_path), tensor_parallel_size=int(tensor_parallel_size),
                      gpu_memory_utilization=float(gpu_memory_utilization), dtype=dtype, seed=int(seed))
        if tokenizer_path:
            kwargs["tokenizer"] = str(tokenizer_path)
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        kwargs.update(llm_kwargs)
        log.info("starting vllm.LLM(%s)", kwargs)
        self.llm = LLM(**kwargs)
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.stats = {"requests": 0, "samples": 0, "chunks": 0, "seconds": 0.0}

    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        tok = self.llm.get_tokenizer()
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def sampling_params(self, req: GenerationRequest):
        from vllm import SamplingParams

        s = req.sampling
        base = s.seed if s.seed is not None else self.seed
        return SamplingParams(n=req.n, temperature=s.temperature, top_p=s.top_p,
                              max_tokens=s.max_tokens, stop=list(s.stop) or None,
                              seed=stable_seed("vllm", base, req.id) % (2 ** 31))

    def generate(self, requests: list[GenerationRequest], *, progress: bool = True,
                 on_result: OnResult | None = None) -> list[GenerationResult]:
        check_unique_ids(requests)
        t0 = time.time()
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self.chunk_size):
            chunk = requests[start:start + self.chunk_size]
            prompts = [self._prompt_text(r.prompt) for r in chunk]
            params = [self.sampling_params(r) for r in chunk]
            outs = self.llm.generate(prompts, params, use_tqdm=progress)
            for req, out in zip(chunk, outs):
                comps = sorted(out.outputs, key=lambda c: c.index)
                res = GenerationResult(id=req.id, texts=[c.text for c in comps],
                                       finish_reasons=[str(c.finish_reason or "stop") for c in comps],
                                       meta={**req.meta, "backend": "vllm"})
                results.append(res)
                self._emit(on_result, res)
                self.stats["samples"] += len(comps)
            self.stats["chunks"] += 1
            log.info("vllm: %d/%d requests done (%.1fs)", start + len(chunk), len(requests), time.time() - t0)
        self.stats["requests"] += len(requests)
        self.stats["seconds"] = round(self.stats["seconds"] + time.time() - t0, 3)
        return results

    def close(self) -> None:
        self.llm = None
