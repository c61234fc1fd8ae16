"""HF <-> Megatron-Core tensor mapping (Qwen3 / Qwen2 / Llama), streamed from safetensors.

One table (``_LAYER_MAP``) says which HF tensors make each Megatron parameter and
how they are fused and split over TP ranks:

* ``linear_qkv``: per KV group ``g`` the rows ``[q heads of g; k_g; v_g]``; a TP rank
  holds a contiguous run of whole groups, so its shard is built from row slices of
  ``q_proj``/``k_proj``/``v_proj`` (same for the Qwen2 biases).
* ``linear_fc1``: ``[gate_r; up_r]`` for TP rank ``r`` (gate and up each split in TP parts).
* ``linear_proj`` / ``linear_fc2``: row-parallel, split on the input dim.
* embedding / output layer: vocab rows, padded with zeros to ``padded_vocab_size``.
* norms (input, post-attention, q/k, final): replicated.

Only the slice a rank needs is read from disk (``safe_open(...).get_slice``), so
loading a 32B model on 16 ranks reads each byte once and holds one tensor at a time.
Both layer-spec flavours are handled: local (``input_layernorm``) and TE
(``linear_qkv.layer_norm_weight``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_sz.errors import CheckpointError
from megatron_sz.model_shape import SHAPE_KEYS, ModelShape, parse_hf_config

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron per-layer suffix -> (kind, HF suffixes under model.layers.{i}.)
_LAYER_MAP = {
    "input_layernorm.weight": ("replicated", ["input_layernorm.weight"]),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ["input_layernorm.weight"]),
    "self_attention.linear_qkv.weight": ("qkv", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight"]),
    "self_attention.linear_qkv.bias": ("qkv", ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                               "self_attn.v_proj.bias"]),
    "self_attention.q_layernorm.weight": ("replicated", ["self_attn.q_norm.weight"]),
    "self_attention.k_layernorm.weight": ("replicated", ["self_attn.k_norm.weight"]),
    "self_attention.linear_proj.weight": ("row", ["self_attn.o_proj.weight"]),
    "pre_mlp_layernorm.weight": ("replicated", ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.weight": ("fc1", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
    "mlp.linear_fc2.weight": ("row", ["mlp.down_proj.weight"]),
}


@dataclass
class Recipe:
    kind: str            # replicated | qkv | fc1 | row | vocab
    hf_names: list[str]


def recipe_for(name: str, *, tied: bool, layer_offset_of=None) -> Optional[Recipe]:
    """HF source of a Megatron parameter named ``name`` (from ``named_parameters``).

    ``layer_offset_of(local_index) -> global index`` maps chunk-local layer numbers.
    Returns None for parameters with no HF counterpart (e.g. ``_extra_state``).
    """
    if name == "embedding.word_embeddings.weight":
        return Recipe("vocab", ["model.embed_tokens.weight"])
    if name == "output_layer.weight":
        return Recipe("vocab", ["model.embed_tokens.weight" if tied else "lm_head.weight"])
    if name == "decoder.final_layernorm.weight":
        return Recipe("replicated", ["model.norm.weight"])
    m = _LAYER_RE.match(name)
    if not m:
        return None
    local, suffix = int(m.group(1)), m.group(2)
    if suffix not in _LAYER_MAP:
        return None
    layer = layer_offset_of(local) if layer_offset_of else local
    kind, hf = _LAYER_MAP[suffix]
    return Recipe(kind, [f"model.layers.{layer}.{s}" for s in hf])


class HFReader:
    """Random access to the tensors of an HF safetensors folder (single file or sharded)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        self._safe_open = safe_open
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                self.where = {k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"not a valid safetensors index ({type(exc).__name__}: {exc})",
                                      where=str(index), fix="re-save the checkpoint, or remove the broken index "
                                                            "of a single-file model") from None
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {self.dir}",
                                      fix="save the HF model with save_pretrained(safe_serialization=True)")
            self.where = {}
            for f in files:
                with self._open(f) as h:
                    for k in h.keys():
                        self.where[k] = f
        self._handles: dict[Path, object] = {}

    def _open(self, f: Path):
        """``safe_open``, with a damaged or foreign file reported as one CheckpointError line."""
        try:
            return self._safe_open(f, framework="pt")
        except Exception as exc:  # SafetensorError (bad header), OSError; the library's type is private
            raise CheckpointError(f"not a readable safetensors file ({str(exc).splitlines()[0][:200]})",
                                  where=str(f), fix="re-download or re-save the checkpoint "
                                                    "(save_pretrained(safe_serialization=True))") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def _h(self, name: str):
        if name not in self.where:
            raise CheckpointError(f"tensor {name!r} is missing from {self.dir}",
                                  fix="the HF checkpoint is incomplete or of another architecture")
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = self._open(f)
        return self._handles[f]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._h(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._h(name).get_tensor(name)

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._h(name).get_slice(name)[start:end]

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._h(name).get_slice(name)[:, start:end]

    def close(self) -> None:
        self._handles.clear()


def _expect(reader: HFReader, name: str, shape: tuple[int, ...]) -> None:
    got = reader.shape(name)
    if got != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(got)} but the config implies {list(shape)}",
                              where=str(reader.dir), fix="the weights do not match config.json (wrong architecture?)")


def hf_shapes(arch: ModelShape) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor shapes for ``arch`` (used to validate before reading)."""
    H, d, nq, ng, F = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups, arch.ffn_hidden_size
    out = {"model.embed_tokens.weight": (arch.vocab_size, H), "model.norm.weight": (H,)}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (arch.vocab_size, H)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (nq * d, H), p + "self_attn.k_proj.weight": (ng * d, H),
            p + "self_attn.v_proj.weight": (ng * d, H), p + "self_attn.o_proj.weight": (H, nq * d),
            p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
            p + "mlp.down_proj.weight": (H, F),
        })
        if arch.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (nq * d,), p + "self_attn.k_proj.bias": (ng * d,),
                        p + "self_attn.v_proj.bias": (ng * d,)})
        if arch.qk_layernorm:
            out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return out


def build_shard(reader: HFReader, recipe: Recipe, arch: ModelShape, *, tp: int, rank: int,
                padded_vocab: int) -> torch.Tensor:
    """This TP rank's Megatron tensor for ``recipe``, reading only the needed slices."""
    shapes = hf_shapes(arch)
    for n in recipe.hf_names:
        if n in shapes:
            _expect(reader, n, shapes[n])
        elif n not in reader:
            reader._h(n)  # raises the missing-tensor error
    kind = recipe.kind
    if kind == "replicated":
        return reader.get(recipe.hf_names[0])
    if kind == "row":
        n = recipe.hf_names[0]
        width = reader.shape(n)[1] // tp
        return reader.cols(n, rank * width, (rank + 1) * width)
    if kind == "fc1":
        gate, up = recipe.hf_names
        per = arch.ffn_hidden_size // tp
        return torch.cat([reader.rows(gate, rank * per, (rank + 1) * per),
                          reader.rows(up, rank * per, (rank + 1) * per)], dim=0)
    if kind == "qkv":
        q, k, v = recipe.hf_names
        d = arch.head_dim
        groups_per_rank = arch.num_query_groups // tp
        q_per_group = arch.num_attention_heads // arch.num_query_groups
        parts = []
        for g in range(rank * groups_per_rank, (rank + 1) * groups_per_rank):
            parts.append(reader.rows(q, g * q_per_group * d, (g + 1) * q_per_group * d))
            parts.append(reader.rows(k, g * d, (g + 1) * d))
            parts.append(reader.rows(v, g * d, (g + 1) * d))
        return torch.cat(parts, dim=0)
    if kind == "vocab":
        n = recipe.hf_names[0]
        per = padded_vocab // tp
        start, end = rank * per, (rank + 1) * per
        real = reader.rows(n, min(start, arch.vocab_size), min(end, arch.vocab_size))
        if real.shape[0] == per:
            return real
        pad = torch.zeros((per - real.shape[0],) + tuple(real.shape[1:]), dtype=real.dtype)
        return torch.cat([real, pad], dim=0)
    raise ValueError(f"unknown recipe kind {kind}")


def layer_offset_fn(model):
    """Map a chunk-local layer index to the global HF layer index."""
    layers = model.decoder.layers
    numbers = [layer.layer_number - 1 for layer in layers]
    return lambda i: numbers[i]


def iter_param_recipes(model) -> Iterator[tuple[str, torch.nn.Parameter, Recipe]]:
    tied = model.arch.tie_word_embeddings
    offset = layer_offset_fn(model)
    for name, param in model.named_parameters():
        recipe = recipe_for(name, tied=tied, layer_offset_of=offset)
        if recipe is None:
            raise CheckpointError(f"Megatron parameter {name!r} has no Hugging Face counterpart",
                                  fix="this layer spec is not supported by the converter")
        yield name, param, recipe


def check_same_arch(model_arch: ModelShape, hf_dir: str | Path) -> None:
    """Refuse an HF folder whose config differs from the model's in any shape-defining key."""
    _, other = parse_hf_config(str(hf_dir))
    for k in SHAPE_KEYS:
        a, b = getattr(model_arch, k), getattr(other, k)
        if a != b:
            raise CheckpointError(f"architecture mismatch: the model has {k}={a!r}, {hf_dir} has {k}={b!r}",
                                  where=str(Path(hf_dir) / "config.json"),
                                  fix="build the model from this checkpoint's config")


def load_hf_weights(model_chunks, hf_dir: str | Path, *, progress: bool = False) -> None:
    """Copy HF safetensors weights into this rank's Megatron shards, tensor by tensor."""
    from megatron.core import parallel_state

    from megatron_sz.megatron.model import unwrap

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    reader = HFReader(hf_dir)
    try:
        for wrapper in chunks:
            model = unwrap(wrapper)
            check_same_arch(model.arch, hf_dir)
            items = list(iter_param_recipes(model))
            if progress:
                from tqdm import tqdm

                items = tqdm(items, desc="load HF weights", unit="tensor")
            for name, param, recipe in items:
                shard = build_shard(reader, recipe, model.arch, tp=tp, rank=rank,
                                    padded_vocab=model.padded_vocab_size)
                if tuple(shard.shape) != tuple(param.shape):
                    raise CheckpointError(f"shape mismatch for {name!r}: HF gives {list(shard.shape)}, "
                                          f"the model expects {list(param.shape)}", where=str(hf_dir))
                with torch.no_grad():
                    param.copy_(shard.to(dtype=param.dtype))
    finally:
        reader.close()
