"""``megatron-sz verify``: check one answer against a reference with the rule verifier.

Exit code 0 when equivalent, 1 when not (including "undecided": the rules could not
tell and an LLM judge would be needed). The one-line verdict says what was compared,
who decided and why, e.g.::

    equivalent: answer '\\frac{1}{2}' vs reference '0.5' (rule: numbers 1/2 vs 1/2)
"""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check whether an answer is equivalent to a reference answer",
        description="Rule-based answer verification (math-verify + sympy + normalisation). "
                    "Exit 0 when equivalent, 1 when not.")
    p.add_argument("--answer", required=True,
                   help="the candidate answer (with --text: a full solution to extract it from; "
                        "'-' reads it from stdin)")
    p.add_argument("--reference", required=True, help="the reference answer, e.g. '\\frac{1}{2}'")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds allowed for the comparison (default 5)")
    p.add_argument("--text", action="store_true",
                   help="treat --answer as a full solution and extract the final answer first "
                        "(last \\boxed{}, 'the answer is ...', else the last number)")
    p.add_argument("--no-last-number", action="store_true",
                   help="with --text: do not fall back to the last number when there is no "
                        "\\boxed{} or answer phrase")
    p.add_argument("--json", action="store_true",
                   help="print the verdict as one JSON object instead of a sentence")
    p.set_defaults(func=run)


def _short(s: str | None, n: int = 80) -> str:
    if s is None:
        return "None"
    return repr(s if len(s) <= n else s[:n] + "...")


def run(args) -> int:
    from megatron_sz.errors import UserError
    from megatron_sz.verify import extract_answer, judge

    if args.timeout <= 0:
        raise UserError(f"--timeout must be > 0, got {args.timeout}", where="--timeout",
                        fix="pass a number of seconds such as 5")
    answer_text = sys.stdin.read() if args.answer == "-" else args.answer
    if args.text:
        answer = extract_answer(answer_text, last_number_fallback=not args.no_last_number)
        source = "extracted "
    else:
        answer, source = answer_text, ""
    verdict = judge(answer, args.reference, timeout_s=args.timeout)
    ok = verdict.equivalent is True
    if args.json:
        print(json.dumps({"equivalent": ok, "decided_by": verdict.decided_by, "reason": verdict.reason,
                          "answer": answer, "reference": args.reference, "extracted": bool(args.text)}))
    else:
        word = "equivalent" if ok else ("not equivalent" if verdict.decided_by == "rule"
                                        else "not equivalent (undecided)")
        print(f"{word}: {source}answer {_short(answer)} vs reference {_short(args.reference)} "
              f"({verdict.decided_by}: {verdict.reason})")
    return 0 if ok else 1
