"""vLLM offline batch backend. The GPU test runs where vllm and a GPU are present; the shard
code it uses is shared with every backend and tested on CPU in test_inference_shards.py."""
from __future__ import annotations

import pytest

from megatron_sz.errors import UserError
from megatron_sz.inference.vllm_backend import VLLMBackend, vllm_available

AVAILABLE, WHY = vllm_available()


@pytest.mark.skipif(AVAILABLE, reason="vllm and a GPU are present; the error path is for CPU hosts")
def test_clear_error_without_vllm(tmp_path):
    with pytest.raises(UserError) as err:
        VLLMBackend(tmp_path)
    assert "vllm" in str(err.value) and "fix:" in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=WHY or "vllm unavailable")
def test_vllm_shard_round_trip(tmp_path, rng_seed):
    from inference_support import build_tiny_model
    from megatron_sz.inference import GenerationRequest, read_results, run_request_shard, write_requests
    from megatron_sz.recipe import SamplingSpec

    model = build_tiny_model(tmp_path / "tiny")
    reqs = [GenerationRequest(id=f"v{i}", prompt=f"Compute {i} + 2.", n=3,
                              sampling=SamplingSpec(temperature=0.8, max_tokens=8, seed=rng_seed % 1000))
            for i in range(10)]
    write_requests(tmp_path / "req.jsonl", reqs)
    be = VLLMBackend(model, gpu_memory_utilization=0.3, chunk_size=4, seed=1, enforce_eager=True)
    counts = run_request_shard(be, tmp_path / "req.jsonl", tmp_path / "res.jsonl", progress=False)
    assert counts["generated"] == 10 and be.stats["chunks"] == 3
    first = {r.id: r.texts for r in read_results(tmp_path / "res.jsonl")}
    assert all(len(t) == 3 for t in first.values())
    (tmp_path / "res2.jsonl").write_text("")
    run_request_shard(be, tmp_path / "req.jsonl", tmp_path / "res2.jsonl", progress=False)
    assert {r.id: r.texts for r in read_results(tmp_path / "res2.jsonl")} == first  # seeded per request
