"""Shared helpers for the inference / rollout / teacher tests: a tiny HF model folder
(random Qwen3 + a SentencePiece tokenizer trained here, no downloads), scripted backends."""
from __future__ import annotations

from pathlib import Path

from megatron_sz.inference.base import GenerationRequest, GenerationResult, InferenceBackend


def build_tiny_model(out: Path, *, seed: int = 0) -> Path:
    """A ~60k-parameter Qwen3ForCausalLM with a SentencePiece tokenizer, saved as an HF folder."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_sz.tokenizer import train_sentencepiece

    texts = [f"Compute {a} + {b}. {a} + {b} = {a + b}. \\boxed{{{a + b}}}" for a in range(20) for b in range(20)]
    tok = train_sentencepiece(texts, out, vocab_size=400, seed=0)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                      tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # a peaked output distribution, so sampling is not near-uniform noise
        model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(out)
    tok.save(out)
    return out


class ScriptedBackend(InferenceBackend):
    """Answers each request with ``reply(request, sample_index, call_number)``; counts calls."""

    name = "scripted"

    def __init__(self, reply):
        super().__init__()
        self.reply = reply
        self.calls: list[GenerationRequest] = []
        self.stats = {"requests": 0}

    def generate(self, requests, *, progress=True, on_result=None):
        out = []
        for req in requests:
            self.calls.append(req)
            self.stats["requests"] += 1
            texts = []
            for j in range(req.n):
                t = self.reply(req, j, len(self.calls))
                if isinstance(t, Exception):
                    res = GenerationResult.failure(req, str(t))
                    break
                texts.append(t)
            else:
                res = GenerationResult(req.id, texts, ["stop"] * len(texts), dict(req.meta))
            out.append(res)
            self._emit(on_result, res)
        return out
