"""Inference backends behind one interface (see ``base``): local CPU, OpenAI-compatible
HTTP, vLLM offline batch. Backends import their heavy dependencies lazily."""
from megatron_sz.inference.base import (GenerationRequest, GenerationResult, InferenceBackend,
                                        make_backend, read_requests, read_results,
                                        run_request_shard, write_requests)

__all__ = ["GenerationRequest", "GenerationResult", "InferenceBackend", "make_backend",
           "read_requests", "read_results", "run_request_shard", "write_requests"]
