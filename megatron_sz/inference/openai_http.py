"""OpenAI-compatible HTTP client: many endpoints, load balancing, retries, resumable shards.

For ``vllm serve`` / ``transformers serve`` / any server speaking ``/v1/chat/completions``
or ``/v1/completions``. Design points (the paper's teacher ran behind many vLLM
endpoints with 32 workers, 600 s timeouts and exponential backoff):

* **Threads, not asyncio**: ``concurrency`` worker threads share one ``httpx.Client``;
  each worker owns one request from first attempt to final result, so "exactly once"
  is easy to see: one request, one ``on_result`` call.
* **Load balancing**: ``least_loaded`` picks the healthy endpoint with the fewest
  requests in flight; ``round_robin`` cycles over healthy endpoints. An endpoint that
  fails (connection error, timeout, 5xx, 429, malformed body) is *cooled down* for
  ``cooldown_s * 2**(consecutive failures - 1)`` seconds (capped at ``backoff_max_s``)
  and skipped meanwhile; one success makes it healthy again. If every endpoint is
  cooling down, the one that recovers first is used.
* **Retries** with exponential backoff and "equal jitter": attempt ``a`` waits
  ``d/2 + U(0, d/2)`` with ``d = min(backoff_max_s, backoff_base_s * 2**a)``. Every retry
  logs one WARNING line and is counted in ``stats`` (``retries``, ``timeouts``,
  ``connection_errors``, ``http_5xx``, ``backoff_s``...). A request that exhausts
  ``max_retries`` comes back as a failed result (``meta["error"]``); other requests go on.
* **n samples**: the ``n`` parameter is sent; if a server returns fewer choices
  (``transformers serve`` ignores ``n``) the rest are requested again, and the endpoint
  is remembered as ignoring ``n``. With ``sampling.seed`` set, each sub-request gets a
  distinct seed derived from it, so repeated requests do not return identical samples.
* 4xx errors other than 408/429 are not retried (a wrong model name will not fix itself).
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

from megatron_sz.errors import UserError
from megatron_sz.inference.base import (GenerationRequest, GenerationResult, InferenceBackend,
                                        OnResult, check_unique_ids, stable_seed)

log = logging.getLogger("megatron_sz.inference.openai")

RETRYABLE_STATUS = {408, 409, 425, 429}


class _Retryable(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Fatal(Exception):
    pass


@dataclass
class Endpoint:
    url: str  # base URL ending in /v1
    in_flight: int = 0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    ok: int = 0
    failed: int = 0
    ignores_n: bool = False

    def summary(self) -> dict:
        return {"ok": self.ok, "failed": self.failed, "in_flight": self.in_flight,
                "ignores_n": self.ignores_n}


def normalize_endpoint(url: str) -> str:
    """``host:8000`` / ``http://host:8000`` / ``http://host:8000/v1/`` -> ``http://host:8000/v1``."""
    u = url.strip()
    if "://" not in u:
        u = "http://" + u
    parsed = urlparse(u)
    if not parsed.netloc:
        raise UserError(f"endpoint {url!r} is not a URL", where="backend.endpoints",
                        fix="write endpoints as http://host:port/v1")
    path = parsed.path.rstrip("/")
    if not path:
        path = "/v1"
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def messages_to_text(messages: list[dict]) -> str:
    return "\n\n".join(str(m.get("content", "")) for m in messages)


class OpenAIBackend(InferenceBackend):
    """Client for one or more OpenAI-compatible endpoints; see the module docstring."""

    name = "openai"

    def __init__(self, endpoints: list[str], *, model: str | None = None, api: str = "chat",
                 api_key: str | None = None, concurrency: int = 32, timeout_s: float = 600.0,
                 max_retries: int = 6, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 cooldown_s: float = 5.0, balance: str = "least_loaded", seed: int = 0,
                 connect_timeout_s: float = 10.0, extra_body: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__()
        import os

        import httpx

        if not endpoints:
            raise UserError("no endpoints given", where="backend.endpoints",
                            fix="list at least one base URL, e.g. http://host:8000/v1")
        if api not in ("chat", "completions"):
            raise UserError(f"api {api!r} is not 'chat' or 'completions'", where="backend.api")
        if balance not in ("least_loaded", "round_robin"):
            raise UserError(f"balance {balance!r} is not 'least_loaded' or 'round_robin'",
                            where="backend.balance")
        self.endpoints = [Endpoint(normalize_endpoint(u)) for u in endpoints]
        self.model = model
        self.api = api
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.cooldown_s = float(cooldown_s)
        self.balance = balance
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rr = 0
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=min(connect_timeout_s, self.timeout_s)),
            limits=httpx.Limits(max_connections=max(self.concurrency, 1) * 2,
                                max_keepalive_connections=max(self.concurrency, 1)))
        self.stats = {"requests": 0, "completed": 0, "failed": 0, "attempts": 0, "retries": 0,
                      "timeouts": 0, "connection_errors": 0, "http_5xx": 0, "http_429": 0,
                      "http_4xx": 0, "bad_responses": 0, "n_fallbacks": 0, "backoff_s": 0.0,
                      "cooldowns": 0, "endpoints": {}}

    @classmethod
    def from_spec(cls, spec, *, model: str | None = None, seed: int = 0) -> "OpenAIBackend":
        return cls(spec.endpoints, model=model or spec.model, api=spec.api, api_key=spec.api_key,
                   concurrency=spec.concurrency, timeout_s=spec.timeout_s,
                   max_retries=spec.max_retries, backoff_base_s=spec.backoff_base_s,
                   backoff_max_s=spec.backoff_max_s, cooldown_s=spec.cooldown_s,
                   balance=spec.balance, seed=seed)

    # ------------------------------------------------------------------ endpoints

    def _acquire(self) -> Endpoint:
        with self._lock:
            now = time.monotonic()
            healthy = [e for e in self.endpoints if e.cooldown_until <= now]
            if not healthy:
                ep = min(self.endpoints, key=lambda e: e.cooldown_until)
            elif self.balance == "round_robin":
                ep = healthy[self._rr % len(healthy)]
                self._rr += 1
            else:
                start = self._rr % len(healthy)  # rotate ties so idle endpoints share load
                self._rr += 1
                rotated = healthy[start:] + healthy[:start]
                ep = min(rotated, key=lambda e: e.in_flight)
            ep.in_flight += 1
            self.stats["attempts"] += 1
            return ep

    def _release(self, ep: Endpoint, ok: bool) -> None:
        with self._lock:
            ep.in_flight -= 1
            if ok:
                ep.ok += 1
                ep.consecutive_failures = 0
                ep.cooldown_until = 0.0
            else:
                ep.failed += 1
                ep.consecutive_failures += 1
                cool = min(self.backoff_max_s, self.cooldown_s * 2 ** (ep.consecutive_failures - 1))
                ep.cooldown_until = time.monotonic() + cool
                self.stats["cooldowns"] += 1

    def _backoff(self, attempt: int) -> float:
        d = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt))
        with self._lock:
            return d / 2 + self._rng.uniform(0, d / 2)

    def _bump(self, key: str, by: float = 1) -> None:
        with self._lock:
            self.stats[key] += by

    def resolve_model(self) -> str:
        """The model name to send: the configured one, else the first of ``GET /models``."""
        if self.model:
            return self.model
        for ep in self.endpoints:
            try:
                r = self._client.get(ep.url + "/models", timeout=min(self.timeout_s, 30.0))
                data = r.json().get("data") or []
                if r.status_code == 200 and data:
                    self.model = str(data[0]["id"])
                    log.info("model not set; using %r served by %s", self.model, ep.url)
                    return self.model
            except Exception:  # noqa: BLE001 - any failure here just means "try the next one"
                continue
        self.model = "default"
        return self.model

    # ------------------------------------------------------------------ one HTTP call

    def _payload(self, req: GenerationRequest, n: int, sub_index: int) -> tuple[str, dict]:
        s = req.sampling
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": s.temperature,
                                "top_p": s.top_p, "max_tokens": s.max_tokens}
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = stable_seed("openai", s.seed, req.id, sub_index) % (2 ** 31)
        body.update(self.extra_body)
        if self.api == "chat":
            msgs = req.prompt if isinstance(req.prompt, list) else [{"role": "user", "content": req.prompt}]
            body["messages"] = msgs
            return "/chat/completions", body
        body["prompt"] = req.prompt if isinstance(req.prompt, str) else messages_to_text(req.prompt)
        return "/completions", body

    def _parse(self, data: Any) -> list[tuple[str, str]]:
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise _Retryable("bad_response", f"response has no choices: {str(data)[:200]}")
        out = []
        for ch in sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            if not isinstance(ch, dict):
                raise _Retryable("bad_response", "a choice is not an object")
            if self.api == "chat":
                msg = ch.get("message") or {}
                text = msg.get("content") if isinstance(msg, dict) else None
            else:
                text = ch.get("text")
            out.append(("" if text is None else str(text), str(ch.get("finish_reason") or "stop")))
        return out

    def _call(self, req: GenerationRequest, n: int, sub_index: int, trace: dict) -> list[tuple[str, str]]:
        """One logical call (with retries) asking for ``n`` choices."""
        import httpx

        last_err = ""
        attempt = 0
        while True:
            ep = self._acquire()
            want = 1 if ep.ignores_n else n
            path, body = self._payload(req, want, sub_index)
            ok = False
            try:
                r = self._client.post(ep.url + path, json=body)
                code = r.status_code
                if code >= 500 or code in RETRYABLE_STATUS:
                    self._bump("http_429" if code == 429 else "http_5xx" if code >= 500 else "http_4xx")
                    raise _Retryable(f"http_{code}", f"HTTP {code}: {r.text[:200]}")
                if code >= 400:
                    if want > 1 and code in (400, 422):
                        # Some servers reject n > 1 outright: ask again for one sample per
                        # call (not counted as a retry; a different 400 fails again below).
                        ep.ignores_n = True
                        self._bump("n_fallbacks")
                        ok = True
                        log.info("%s rejected n=%d (HTTP %d); asking one sample per call", ep.url, want, code)
                        continue
                    self._bump("http_4xx")
                    ok = True  # the endpoint is alive; the request is what is wrong
                    raise _Fatal(f"HTTP {code} from {ep.url}{path}: {r.text[:300]}")
                try:
                    data = r.json()
                except (json.JSONDecodeError, ValueError):
                    raise _Retryable("bad_response", f"non-JSON body: {r.text[:200]!r}") from None
                choices = self._parse(data)
                if want > 1 and len(choices) < want and not ep.ignores_n:
                    ep.ignores_n = True
                    self._bump("n_fallbacks")
                    log.info("%s returned %d of n=%d choices; asking for the rest one at a time",
                             ep.url, len(choices), want)
                ok = True
                trace["endpoints"].append(ep.url)
                return choices[:n]
            except httpx.TimeoutException as exc:
                self._bump("timeouts")
                last_err = f"timeout after {self.timeout_s:g}s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                self._bump("connection_errors")
                last_err = f"connection error ({type(exc).__name__}: {exc})"
            except _Retryable as exc:
                if exc.kind == "bad_response":
                    self._bump("bad_responses")
                last_err = str(exc)
            finally:
                self._release(ep, ok)
            trace["errors"].append(f"{ep.url}: {last_err}")
            if attempt >= self.max_retries:
                break
            delay = self._backoff(attempt)
            attempt += 1
            self._bump("retries")
            self._bump("backoff_s", delay)
            log.warning("request %s: attempt %d/%d on %s failed (%s); retrying in %.2fs",
                        req.id, attempt, self.max_retries + 1, ep.url, last_err, delay)
            self._sleep(delay)
        raise _Fatal(f"gave up after {self.max_retries + 1} attempts; last error: {last_err}")

    def _one(self, req: GenerationRequest) -> GenerationResult:
        trace: dict = {"endpoints": [], "errors": []}
        texts: list[str] = []
        reasons: list[str] = []
        t0 = time.time()
        try:
            while len(texts) < req.n:
                got = self._call(req, req.n - len(texts), len(texts), trace)
                texts.extend(t for t, _ in got)
                reasons.extend(r for _, r in got)
        except _Fatal as exc:
            self._bump("failed")
            return GenerationResult.failure(req, str(exc), backend="openai",
                                            attempt_errors=trace["errors"][-5:])
        self._bump("completed")
        meta = {**req.meta, "backend": "openai", "endpoints": sorted(set(trace["endpoints"])),
                "retries": len(trace["errors"]), "seconds": round(time.time() - t0, 3)}
        return GenerationResult(id=req.id, texts=texts, finish_reasons=reasons, meta=meta)

    # ------------------------------------------------------------------ batch

    def generate(self, requests: list[GenerationRequest], *, progress: bool = True,
                 on_result: OnResult | None = None) -> list[GenerationResult]:
        check_unique_ids(requests)
        if not requests:
            return []
        self.resolve_model()
        self._bump("requests", len(requests))
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="openai generate", unit="req", mininterval=2.0, leave=False)
        workers = max(1, min(self.concurrency, len(requests)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai")
        try:
            futs = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for fut in as_completed(futs):
                i = futs[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - a bug in one request must not sink the batch
                    log.exception("request %s crashed", requests[i].id)
                    self._bump("failed")
                    res = GenerationResult.failure(requests[i], f"internal error: {exc!r}", backend="openai")
                results[i] = res
                self._emit(on_result, res)
                if bar is not None:
                    bar.update(1)
        except BaseException:
            # Ctrl-C / SystemExit: drop queued requests instead of draining them; results
            # already handed to on_result are kept, the rest are redone by a rerun.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
        with self._lock:
            self.stats["endpoints"] = {e.url: e.summary() for e in self.endpoints}
            self.stats["backoff_s"] = round(self.stats["backoff_s"], 3)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._client.close()
