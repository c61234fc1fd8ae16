"""Teacher roles: verify, refine, self-verify (symbolic or LLM-backed). See ``base``."""
from megatron_sz.teacher.base import (RefineJob, RefineOutcome, SelfVerifyOutcome, Teacher,
                                      load_template, make_teacher, render)
from megatron_sz.teacher.parsing import ParsedReply, parse_judge_reply, parse_json_reply, parse_refine_reply

__all__ = ["Teacher", "RefineJob", "RefineOutcome", "SelfVerifyOutcome", "make_teacher",
           "load_template", "render", "SymbolicTeacher", "LLMTeacher", "ParsedReply",
           "parse_json_reply", "parse_refine_reply", "parse_judge_reply"]


def __getattr__(name):  # lazy: sympy / backends load only when used
    if name == "SymbolicTeacher":
        from megatron_sz.teacher.symbolic import SymbolicTeacher
        return SymbolicTeacher
    if name == "LLMTeacher":
        from megatron_sz.teacher.llm import LLMTeacher
        return LLMTeacher
    raise AttributeError(name)
