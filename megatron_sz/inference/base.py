"""Inference requests, results, the backend interface, and the shared shard I/O.

Every backend (local CPU, OpenAI-compatible HTTP, vLLM offline batch) speaks the same
two records and the same JSONL shard format, so the teacher partition can run a shard
with vLLM, an HTTP client, or a CPU model and produce byte-compatible results:

* a **request shard** is JSONL of ``GenerationRequest`` (``id``, ``prompt`` as a string
  or a list of chat messages, ``n``, ``sampling``, ``meta``);
* a **result shard** is JSONL of ``GenerationResult`` (``id``, ``texts``,
  ``finish_reasons``, ``meta``), appended one durable line per finished request.

What is unusual: results are written *as requests finish* (backends call
``on_result``), through ``data.JsonlAppender`` keyed by request id. A rerun of the same
shard skips ids already written; a killed run loses only the requests in flight and
never writes a result twice. A request that failed for good (retries exhausted) comes
back as a result with ``meta["error"]`` and no texts; ``run_request_shard`` does not
write it, so the next rerun tries it again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from megatron_sz.errors import DataError, UserError
from megatron_sz.recipe import BackendSpec, SamplingSpec

log = logging.getLogger("megatron_sz.inference")

OnResult = Callable[["GenerationResult"], None]


@dataclass
class GenerationRequest:
    """One prompt to sample ``n`` completions for."""

    id: str
    prompt: str | list[dict]
    n: int = 1
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    meta: dict = field(default_factory=dict)

    def validate(self, where: str = "request") -> None:
        if not isinstance(self.id, str) or not self.id:
            raise DataError(f"request id must be a non-empty string, got {self.id!r}", where=where,
                            fix="give every request a unique string 'id'")
        if isinstance(self.prompt, str):
            pass
        elif isinstance(self.prompt, list) and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in self.prompt):
            pass
        else:
            raise DataError(f"request {self.id!r}: 'prompt' must be a string or a list of "
                            "{'role', 'content'} messages", where=where,
                            fix="write the prompt as text or as chat messages")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise DataError(f"request {self.id!r}: 'n' must be an integer >= 1, got {self.n!r}",
                            where=where, fix="set n to the number of samples wanted")
        try:
            self.sampling.check()
        except ValueError as exc:
            raise DataError(f"request {self.id!r}: sampling {exc}", where=where,
                            fix="correct the request's sampling parameters") from None

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "n": self.n,
                "sampling": dataclasses.asdict(self.sampling), "meta": self.meta}

    @classmethod
    def from_dict(cls, obj: Any, *, where: str = "request") -> "GenerationRequest":
        if not isinstance(obj, dict):
            raise DataError("a request must be a JSON object", where=where,
                            fix="one object per line with id, prompt, n, sampling, meta")
        unknown = set(obj) - {"id", "prompt", "n", "sampling", "meta"}
        if unknown:
            raise DataError(f"unknown request field(s) {sorted(unknown)}", where=where,
                            fix="a request has the fields id, prompt, n, sampling, meta")
        for key in ("id", "prompt"):
            if key not in obj:
                raise DataError(f"request is missing {key!r}", where=where, fix=f"add {key!r}")
        sampling = obj.get("sampling") or {}
        if not isinstance(sampling, dict):
            raise DataError("'sampling' must be an object", where=where,
                            fix="e.g. {\"temperature\": 0.8, \"max_tokens\": 512}")
        names = {f.name for f in dataclasses.fields(SamplingSpec)}
        bad = set(sampling) - names
        if bad:
            raise DataError(f"unknown sampling field(s) {sorted(bad)}", where=where,
                            fix=f"valid sampling fields: {', '.join(sorted(names))}")
        try:
            spec = SamplingSpec(**sampling)
        except TypeError as exc:
            raise DataError(f"bad sampling: {exc}", where=where, fix="check the sampling object") from None
        req = cls(id=obj["id"], prompt=obj["prompt"], n=obj.get("n", 1), sampling=spec,
                  meta=dict(obj.get("meta") or {}))
        req.validate(where)
        return req


@dataclass
class GenerationResult:
    """The ``n`` completions of one request. ``meta`` keeps the request's meta plus
    backend facts (``backend``, ``attempts``, ``endpoint``, ``error`` on failure)."""

    id: str
    texts: list[str]
    finish_reasons: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return "error" not in self.meta

    def to_dict(self) -> dict:
        return {"id": self.id, "texts": self.texts, "finish_reasons": self.finish_reasons,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, obj: Any, *, where: str = "result") -> "GenerationResult":
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("texts"), list):
            raise DataError("a result needs 'id' and a 'texts' list", where=where,
                            fix="result shards are written by run_request_shard; do not edit them")
        return cls(id=str(obj["id"]), texts=[str(t) for t in obj["texts"]],
                   finish_reasons=[str(r) for r in obj.get("finish_reasons") or []],
                   meta=dict(obj.get("meta") or {}))

    @classmethod
    def failure(cls, req: GenerationRequest, error: str, **meta: Any) -> "GenerationResult":
        return cls(id=req.id, texts=[], finish_reasons=[], meta={**req.meta, **meta, "error": error})


class InferenceBackend:
    """Generate ``n`` completions per request.

    ``generate`` returns one result per request, in request order. ``on_result`` (if
    given) is called once per request as soon as it is finished, from any thread but
    never concurrently, so callers can persist results incrementally. A failed request
    yields a result with ``meta["error"]`` instead of raising. ``stats`` holds counters.
    """

    name = "base"

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}
        self._cb_lock = threading.Lock()

    def generate(self, requests: list[GenerationRequest], *, progress: bool = True,
                 on_result: OnResult | None = None) -> list[GenerationResult]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "InferenceBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _emit(self, on_result: OnResult | None, result: GenerationResult) -> None:
        if on_result is not None:
            with self._cb_lock:
                on_result(result)


def check_unique_ids(requests: Iterable[GenerationRequest], where: str = "requests") -> None:
    seen: set[str] = set()
    for r in requests:
        if r.id in seen:
            raise DataError(f"duplicate request id {r.id!r}", where=where,
                            fix="request ids key the resumable result shard; make them unique")
        seen.add(r.id)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (sha256), the same on every machine and Python."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- shard I/O


def read_requests(path: str | Path) -> list[GenerationRequest]:
    """Read a request shard; malformed lines raise ``DataError`` naming file:line."""
    from megatron_sz.data import iter_jsonl_rows

    out = [GenerationRequest.from_dict(obj, where=where)
           for where, obj in iter_jsonl_rows(path, what="JSON request object")]
    check_unique_ids(out, str(path))
    return out


def write_requests(path: str | Path, requests: Iterable[GenerationRequest]) -> int:
    """Atomically write a request shard."""
    from megatron_sz.data import write_jsonl

    reqs = list(requests)
    check_unique_ids(reqs, str(path))
    return write_jsonl(path, [r.to_dict() for r in reqs])


def read_results(path: str | Path) -> list[GenerationResult]:
    """Read a result shard (a partial last line from a killed writer is ignored)."""
    from megatron_sz.data import iter_jsonl_rows

    return [GenerationResult.from_dict(o, where=where)
            for where, o in iter_jsonl_rows(path, allow_partial_tail=True)]


def run_request_shard(backend: InferenceBackend, requests_jsonl: str | Path,
                      results_jsonl: str | Path, *, progress: bool = True,
                      requests: list[GenerationRequest] | None = None) -> dict:
    """Run every request of a shard not yet in the result shard; resumable.

    Returns counts: ``total``, ``skipped`` (already done), ``generated``, ``failed``
    (not written; a rerun retries them), ``seconds``, and the backend's ``stats``.
    """
    from megatron_sz.data import JsonlAppender

    reqs = requests if requests is not None else read_requests(requests_jsonl)
    t0 = time.time()
    appender = JsonlAppender(results_jsonl, key=lambda o: str(o["id"]))
    try:
        todo = [r for r in reqs if r.id not in appender.done]
        skipped = len(reqs) - len(todo)
        counts = {"generated": 0, "failed": 0}

        def on_result(res: GenerationResult) -> None:
            if res.ok:
                if appender.append(res.to_dict()):
                    counts["generated"] += 1
            else:
                counts["failed"] += 1
                log.warning("request %s failed for good: %s (not written; a rerun retries it)",
                            res.id, res.meta.get("error"))

        if skipped:
            log.info("%s: %d of %d requests already done, skipping them", results_jsonl, skipped, len(reqs))
        if todo:
            backend.generate(todo, progress=progress, on_result=on_result)
    finally:
        appender.close()
    return {"total": len(reqs), "skipped": skipped, **counts,
            "seconds": round(time.time() - t0, 3), "stats": _jsonable(backend.stats)}


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)


# --------------------------------------------------------------------------- factory


def make_backend(spec: BackendSpec, *, model_path: str | None = None,
                 tokenizer_path: str | None = None, seed: int = 0) -> InferenceBackend:
    """Build the backend a recipe's ``BackendSpec`` describes.

    ``model_path`` overrides ``spec.model`` for the local and vLLM backends (the
    checkpoint a round just trained); the OpenAI backend uses ``spec.model`` as the
    served model name, or ``model_path`` when the spec has none.
    """
    if spec.kind == "local":
        from megatron_sz.inference.local import LocalBackend

        path = model_path or spec.model
        if not path:
            raise UserError("the local backend needs a model folder", where="backend.model",
                            fix="set backend.model to an HF checkpoint folder or pass model_path")
        return LocalBackend(path, tokenizer_path=tokenizer_path, seed=seed,
                            batch_size=spec.batch_size)
    if spec.kind == "openai":
        from megatron_sz.inference.openai_http import OpenAIBackend

        return OpenAIBackend.from_spec(spec, model=spec.model or model_path, seed=seed)
    if spec.kind == "vllm":
        from megatron_sz.inference.vllm_backend import VLLMBackend

        path = model_path or spec.model
        if not path:
            raise UserError("the vllm backend needs a model path", where="backend.model",
                            fix="set backend.model to an HF checkpoint folder")
        return VLLMBackend(path, tokenizer_path=tokenizer_path,
                           tensor_parallel_size=spec.tensor_parallel_size,
                           gpu_memory_utilization=spec.gpu_memory_utilization,
                           max_model_len=spec.max_model_len, seed=seed,
                           chunk_size=spec.chunk_size, dtype=spec.dtype)
    raise UserError(f"unknown backend kind {spec.kind!r}", where="backend.kind",
                    fix="use one of: local, openai, vllm")
