"""Rule-based answer verification (the paper's "MathRule").

Public API::

    extract_answer(text, *, last_number_fallback=True) -> str | None
    is_equivalent(answer, reference, *, timeout_s=5.0) -> bool
    verify_batch(pairs, *, workers=0, timeout_s=5.0, progress=False) -> BatchVerdict
    judge(answer, reference, *, timeout_s=5.0) -> Verdict     # one pair, with the reason
    warm_up() -> bool        # start the symbolic worker ahead of time (optional)

What is unusual here:

* Three layers, cheapest first. (1) guards + canonicalisation + exact/structural
  comparison in pure Python (``normalize.py``) decide most answers in microseconds;
  (2) math-verify, then (3) a plain sympy fallback (``symbolic.py``) run only for
  what is left (radicals, pi, algebra).
* The symbolic layers run in a persistent child process that is killed when an answer
  exceeds ``timeout_s`` (``sandbox.py``); signals cannot stop sympy inside C code, a
  kill can. Inputs that could hang it (``9^9^9^9``, ``10^{10^{10}}``, ``(10^6)!``,
  deep nesting, > 1,000 characters) are rejected before they get there.
* Every verdict says who decided: ``"rule"`` (these rules settled it, True or False)
  or ``"undecided"`` (no answer, unparseable, timeout, or two different word answers
  that might be synonyms): those need the LLM judge. ``is_equivalent`` maps undecided
  to False.
"""
from __future__ import annotations

import concurrent.futures
import queue
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from megatron_sz.verify.extract import extract_answer
from megatron_sz.verify.normalize import (MAX_ANSWER_CHARS, Approx, Canon, canonicalize, compare_values,
                                          numbers_close, parse_value, unsafe_reason)
from megatron_sz.verify.worker import Worker, default_worker

__all__ = ["extract_answer", "is_equivalent", "verify_batch", "judge", "warm_up", "Verdict",
           "BatchVerdict"]

RULE = "rule"
UNDECIDED = "undecided"


@dataclass
class Verdict:
    """The outcome for one (answer, reference) pair."""

    equivalent: bool | None
    decided_by: str  # "rule" | "undecided"
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BatchVerdict:
    """Verdicts in input order, plus which share the rules settled."""

    results: list[Verdict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rule_share(self) -> float:
        return sum(r.decided_by == RULE for r in self.results) / max(1, len(self.results))

    @property
    def undecided_share(self) -> float:
        return sum(r.decided_by == UNDECIDED for r in self.results) / max(1, len(self.results))

    @property
    def equivalent_share(self) -> float:
        return sum(r.equivalent is True for r in self.results) / max(1, len(self.results))

    def summary(self) -> dict:
        return {"n": len(self.results), "rule_share": self.rule_share,
                "undecided_share": self.undecided_share, "equivalent_share": self.equivalent_share,
                "seconds": round(self.seconds, 3)}


def _rule(eq: bool, reason: str) -> Verdict:
    return Verdict(bool(eq), RULE, reason)


def _undecided(reason: str) -> Verdict:
    return Verdict(None, UNDECIDED, reason)


def _fast(answer, reference) -> tuple[Verdict | None, dict | None]:
    """Decide in-process if possible; otherwise return the request for the symbolic worker."""
    if answer is None or not str(answer).strip():
        return _undecided("no answer extracted"), None
    if reference is None or not str(reference).strip():
        return _undecided("empty reference"), None
    a, b = str(answer), str(reference)
    if a.strip() == b.strip():
        return _rule(True, "identical strings"), None
    for name, s in (("answer", a), ("reference", b)):
        # Only the size guard here (it keeps canonicalize cheap); the structural guards run
        # on the canonical text below, which is what reaches sympy -- on the raw text they
        # would misread markdown ("**5**") as a power tower.
        if len(s) > MAX_ANSWER_CHARS:
            return _undecided(f"unparseable {name}: {unsafe_reason(s)}"), None
    ca, cb = canonicalize(a), canonicalize(b)
    for name, c in (("answer", ca), ("reference", cb)):
        if not c.text:
            return _undecided(f"{name} is empty after normalisation"), None
        why = unsafe_reason(c.text)
        if why:
            return _undecided(f"unparseable {name}: {why}"), None
    if ca.text == cb.text:
        return _rule(True, f"same after normalisation ({_show(cb.text)})"), None
    if ca.is_text or cb.is_text:
        if ca.is_text and cb.is_text:
            return _undecided(f"different word answers ({_show(ca.text)} vs {_show(cb.text)}); "
                              "a judge may know synonyms"), None
        return _undecided("a word answer against a mathematical one"), None
    va, vb = parse_value(ca.text), parse_value(cb.text)
    if isinstance(va, Fraction) and isinstance(vb, Fraction):
        xs = [va] + ([va / 100] if ca.percent and not cb.percent else [])
        ys = [vb] + ([vb / 100] if cb.percent and not ca.percent else [])
        approx = isinstance(va, Approx) or isinstance(vb, Approx)
        eq = any(numbers_close(x, y, approx=approx) for x in xs for y in ys)
        return _rule(eq, f"numbers {_num(va)} vs {_num(vb)}" + (" (percent)" if ca.percent != cb.percent else "")), None
    r = compare_values(va, vb)
    if r is not None:
        return _rule(r, "structure (tuple/set/interval/list) compared"), None
    return None, {"a": ca.text, "b": cb.text, "a_percent": ca.percent, "b_percent": cb.percent,
                  "a_degrees": ca.degrees, "b_degrees": cb.degrees}


def _show(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def _num(x: Fraction) -> str:
    return str(x) if x.denominator < 10**6 else f"{float(x):.6g}"


# The worker's one-time import of sympy + math-verify takes ~0.6 s on an idle core and
# 3-4 s on a 2-core box at load 15 (measured). A cold start is always waited for (up to
# COLD_START_S) and then leaves at least min(2 s, timeout_s/2) for the comparison itself
# (real ones take 0.01-0.5 s), so a cold start does not turn a correct answer into a
# timeout, while a hanging input still ends near timeout_s. Restarts after a kill begin
# in the background at once and count against the next answer's timeout.
COLD_START_S = 120.0


def warm_up(timeout_s: float = COLD_START_S) -> bool:
    """Start the shared symbolic worker now (e.g. at the start of a rollout); True when ready."""
    w = default_worker()
    with w.lock:
        return w.wait_ready(time.monotonic() + timeout_s)


def _symbolic(request: dict, worker: Worker, timeout_s: float, started: float) -> Verdict:
    lock_wait = timeout_s + (0.0 if worker.ever_ready else COLD_START_S)
    if not worker.lock.acquire(timeout=max(0.0, started + lock_wait - time.monotonic())):
        return _undecided(f"timeout: verifier busy for {timeout_s:g}s")
    try:
        # Leave a small margin so that the whole call, kill included, ends within timeout_s.
        deadline = started + max(0.05, timeout_s - min(0.25, 0.1 * timeout_s))
        if not worker.ever_ready:
            try:
                worker.wait_ready(time.monotonic() + COLD_START_S)
            except OSError:
                pass  # cannot spawn: handled below
            # After a cold start, still allow a real comparison (legit ones take < 0.5 s),
            # without letting a hanging input run much past timeout_s.
            deadline = max(deadline, time.monotonic() + min(2.0, 0.5 * timeout_s))
        try:
            reply = worker.call(dict(request, timeout_s=timeout_s), deadline)
        except OSError as err:  # cannot spawn a process here: run in-process, unguarded
            from megatron_sz.verify.symbolic import symbolic_equal
            eq, how = symbolic_equal(request["a"], request["b"], timeout_s=timeout_s,
                                     **{k: v for k, v in request.items() if k.endswith(("percent", "degrees"))})
            reply = {"eq": eq, "how": f"{how} (in-process: {err})"}
    finally:
        worker.lock.release()
    if reply is None:
        if worker.last_failure == "crashed":
            return _undecided("the symbolic checker crashed on this input (restarted)")
        return _undecided(f"timeout after {timeout_s:g}s in the symbolic checker")
    if reply.get("eq") is None:
        return _undecided(str(reply.get("how") or "unparseable"))
    return _rule(bool(reply["eq"]), str(reply.get("how")))


def judge(answer: str | None, reference: str, *, timeout_s: float = 5.0,
          _worker: Worker | None = None) -> Verdict:
    """The full verdict for one pair: equivalent (or None), who decided, and why."""
    started = time.monotonic()
    try:
        verdict, request = _fast(answer, reference)
        if verdict is not None:
            return verdict
        return _symbolic(request, _worker or default_worker(), timeout_s, started)
    except Exception as err:  # noqa: BLE001 -- a verifier bug must never kill a rollout
        return _undecided(f"verifier error: {type(err).__name__}: {err}"[:300])


def is_equivalent(answer: str | None, reference: str, *, timeout_s: float = 5.0) -> bool:
    """True when ``answer`` is mathematically the same as ``reference``.

    Returns within about ``timeout_s`` seconds whatever the input; undecidable, unparseable
    and timed-out answers are False (use ``judge`` to see why).
    """
    return judge(answer, reference, timeout_s=timeout_s).equivalent is True


def verify_batch(pairs: list[tuple[str | None, str]], *, workers: int = 0,
                 timeout_s: float = 5.0, progress: bool = False) -> BatchVerdict:
    """Verify many (answer, reference) pairs, results in input order.

    Pairs the pure-Python rules settle cost well under a millisecond each and never leave
    this process. The rest go to symbolic workers: the shared one when ``workers == 0``,
    else a pool of ``workers`` killable processes (started once per call; their import
    is waited for outside the per-answer timeout). ``progress`` shows a tqdm bar over
    the symbolic checks.
    """
    t0 = time.monotonic()
    results: list[Verdict | None] = [None] * len(pairs)
    pending: list[tuple[int, dict]] = []
    for i, (answer, reference) in enumerate(pairs):
        try:
            verdict, request = _fast(answer, reference)
        except Exception as err:  # noqa: BLE001
            verdict, request = _undecided(f"verifier error: {type(err).__name__}: {err}"[:300]), None
        if verdict is not None:
            results[i] = verdict
        else:
            pending.append((i, request))
    bar = None
    if progress and pending:
        from tqdm import tqdm
        bar = tqdm(total=len(pending), desc="verify (symbolic)", unit="pair")
    if pending and workers <= 0:
        w = default_worker()
        for i, request in pending:
            results[i] = _symbolic(request, w, timeout_s, time.monotonic())
            if bar is not None:
                bar.update(1)
    elif pending:
        pool = [Worker() for _ in range(min(workers, len(pending)))]
        try:
            for w in pool:
                w.start()
            for w in pool:
                w.wait_ready(time.monotonic() + 120.0)
            free: queue.Queue[Worker] = queue.Queue()
            for w in pool:
                free.put(w)

            def run(item: tuple[int, dict]) -> None:
                i, request = item
                w = free.get()
                try:
                    results[i] = _symbolic(request, w, timeout_s, time.monotonic())
                except Exception as err:  # noqa: BLE001
                    results[i] = _undecided(f"verifier error: {type(err).__name__}")
                finally:
                    free.put(w)
                    if bar is not None:
                        bar.update(1)

            with concurrent.futures.ThreadPoolExecutor(max_workers=len(pool)) as ex:
                list(ex.map(run, pending))
        finally:
            for w in pool:
                w.kill()
    if bar is not None:
        bar.close()
    return BatchVerdict(results=[r for r in results], seconds=time.monotonic() - t0)
