"""HF <-> Megatron-Core conversion and the logits parity check behind ``megatron-sz convert``.

* ``hf_to_mcore``: validates config and every HF tensor's shape up front (clear error
  naming the tensor or key, before any rank starts), then runs ``tp*pp`` ranks (spawned
  here on one host, or the ranks of an existing torchrun/srun world). Each rank reads
  only its own slices from the safetensors files and the model is saved with
  ``dist_checkpointing`` (global shapes: loadable at any TP/PP). Peak memory is one
  copy of the model spread over the ranks plus the tensor being read.
* ``mcore_to_hf``: streams the checkpoint one layer at a time (a ``ShardedTensor``
  request per tensor for that layer's slice of the stacked ``decoder.layers.*`` keys),
  un-fuses QKV / gate-up, strips vocab padding, and writes size-capped safetensors
  shards + index + ``config.json`` (+ tokenizer files if the checkpoint has them).
  Never holds more than one layer.
* ``check``: HF logits (transformers, fp32) vs Megatron logits at the requested TP/PP
  on random full-length sequences; returns the max abs difference.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from megatron_sz.errors import CheckpointError, UserError
from megatron_sz.model_shape import FAMILIES, check_layout, model_shape, read_hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
_IGNORED_HF = ("rotary_emb.inv_freq",)


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


@contextlib.contextmanager
def _world():
    """A torch.distributed world: the existing one, or a temporary 1-rank gloo group."""
    import torch.distributed as tdist

    from megatron_sz.dist import free_port

    if tdist.is_initialized():
        yield tdist.get_rank(), tdist.get_world_size()
        return
    # A private rendezvous, not MASTER_PORT in os.environ: child processes started later
    # (trainers of the local executor) must not inherit a port number from us.
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield 0, 1
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        tdist.destroy_process_group()


def _dtype_of_config(cfg: dict) -> torch.dtype:
    from megatron_sz.megatron.model import resolve_dtype

    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    try:
        return resolve_dtype(d)
    except ValueError:
        return torch.float32


def validate_hf_folder(hf_dir: str | Path) -> tuple[dict, object]:
    """Check config + every tensor name/shape of an HF folder; returns (config, arch)."""
    from megatron_sz.megatron.weights import HFReader, hf_shapes

    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    arch = model_shape(cfg, where=str(hf_dir / "config.json"))
    reader = HFReader(hf_dir)
    try:
        want = hf_shapes(arch)
        for name, shape in want.items():
            if name not in reader:
                raise CheckpointError(f"tensor {name!r} is missing", where=str(hf_dir),
                                      fix="the checkpoint is incomplete or does not match config.json")
            got = reader.shape(name)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}",
                                      where=str(hf_dir), fix="the weights do not match config.json")
        for name in reader.names():
            if name in want or name.endswith(_IGNORED_HF) or (name == "lm_head.weight" and arch.tie_word_embeddings):
                continue
            raise CheckpointError(f"unexpected tensor {name!r} for model_type={arch.model_type!r}",
                                  where=str(hf_dir), fix=f"wrong architecture? supported: {', '.join(FAMILIES)}")
    finally:
        reader.close()
    return cfg, arch


# --------------------------------------------------------------------------- HF -> mcore


def _hf_to_mcore_rank(rank: int, world: int, hf_dir: str, out_dir: str, tp: int, pp: int, dtype: str,
                      divisible_by: int, progress: bool) -> str:
    from megatron_sz.megatron.checkpoint import save_checkpoint
    from megatron_sz.megatron.model import build_model, initialize_parallel
    from megatron_sz.megatron.weights import load_hf_weights

    initialize_parallel(tp, pp)
    chunks = build_model(hf_dir, tp=tp, pp=pp, params_dtype=dtype, make_vocab_size_divisible_by=divisible_by,
                         init_weights=False)
    load_hf_weights(chunks, hf_dir, progress=progress and rank == 0)
    path = save_checkpoint(out_dir, chunks, step=0,
                           extra_state={"converted_from": str(Path(hf_dir).resolve()), "tp": tp, "pp": pp})
    return str(path)


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, *,
                dtype: Optional[str] = None, make_vocab_size_divisible_by: int = 128,
                progress: bool = True) -> Path:
    """Convert an HF folder to a Megatron dist checkpoint under ``out_dir`` (``iter_0000000`` + ``latest``)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg, arch = validate_hf_folder(hf_dir)
    check_layout(arch, tp=tp, pp=pp, vocab_divisible_by=make_vocab_size_divisible_by)
    dt = dtype or str(_dtype_of_config(cfg)).replace("torch.", "")
    args = (str(hf_dir), str(out_dir), tp, pp, dt, make_vocab_size_divisible_by, progress)
    import torch.distributed as tdist

    if tdist.is_initialized():
        if tdist.get_world_size() % (tp * pp):
            raise UserError(f"running in a world of {tdist.get_world_size()} ranks, not a multiple of "
                            f"tp*pp={tp * pp}", fix="launch tp*pp ranks, or run without torchrun to spawn them")
        path = _hf_to_mcore_rank(tdist.get_rank(), tdist.get_world_size(), *args)
        if tdist.get_rank() == 0:
            _copy_side_files(hf_dir, out_dir)
        tdist.barrier()
        return Path(path)
    if tp * pp == 1:
        with _world():
            path = _hf_to_mcore_rank(0, 1, *args)
    else:
        from megatron_sz.dist import spawn

        path = spawn(_hf_to_mcore_rank, tp * pp, *args)[0]
    _copy_side_files(hf_dir, out_dir)
    return Path(path)


# --------------------------------------------------------------------------- mcore -> HF


def read_region(ckpt: str | Path, request: dict[str, torch.Tensor], offsets: dict[str, tuple[int, ...]]) -> None:
    """Fill each ``request[key]`` with the region of the stored global tensor that starts
    at ``offsets[key]`` (same rank as the tensor). Plain ``torch.distributed.checkpoint``
    reads, no process group: only the overlapping stored chunks are read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class _RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, tensor in self.state_dict.items():
                md = self.metadata.state_dict_metadata[key]
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[key]), sizes=tensor.shape)
                items.extend(create_read_items_for_chunk_list(key, md, [chunk]))
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    dcp.load(request, storage_reader=dcp.FileSystemReader(str(ckpt)),
             planner=_RegionPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)


class _ShardWriter:
    """Size-capped safetensors shards, named ``model-0000i-of-0000N`` once N is known."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buf[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        path = self.out / f".part-{len(self.files):05d}.safetensors"
        save_file(self.buf, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buf)))
        self.buf, self.size = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.files[0][0], self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _layer_keys(arch) -> dict[str, str]:
    """Megatron checkpoint key -> role, for the per-layer stacked tensors."""
    keys = {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "input_norm",
        "decoder.layers.self_attention.linear_qkv.weight": "qkv",
        "decoder.layers.self_attention.linear_proj.weight": "o",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": "post_norm",
        "decoder.layers.mlp.linear_fc1.weight": "fc1",
        "decoder.layers.mlp.linear_fc2.weight": "down",
    }
    if arch.qkv_bias:
        keys["decoder.layers.self_attention.linear_qkv.bias"] = "qkv_bias"
    if arch.qk_layernorm:
        keys["decoder.layers.self_attention.q_layernorm.weight"] = "q_norm"
        keys["decoder.layers.self_attention.k_layernorm.weight"] = "k_norm"
    return keys


_HF_TO_MCORE_LAYER = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "self_attn.q_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.k_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.v_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.q_proj.bias": "self_attention.linear_qkv.bias",
    "self_attn.k_proj.bias": "self_attention.linear_qkv.bias",
    "self_attn.v_proj.bias": "self_attention.linear_qkv.bias",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "mlp.gate_proj.weight": "mlp.linear_fc1.weight",
    "mlp.up_proj.weight": "mlp.linear_fc1.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}


def megatron_key_for_hf(name: str, *, tied: bool) -> Optional[str]:
    """The dist-checkpoint key holding HF tensor ``name`` (layers are stacked in one key)."""
    if name == "model.embed_tokens.weight" or (name == "lm_head.weight" and tied):
        return "embedding.word_embeddings.weight"
    if name == "lm_head.weight":
        return "output_layer.weight"
    if name == "model.norm.weight":
        return "decoder.final_layernorm.weight"
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_TO_MCORE_LAYER:
        return "decoder.layers." + _HF_TO_MCORE_LAYER[parts[3]]
    return None


def _split_qkv(t: torch.Tensor, arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, ng = arch.head_dim, arch.num_query_groups
    qpg = arch.num_attention_heads // ng
    rest = tuple(t.shape[1:])
    g = t.reshape((ng, (qpg + 2) * d) + rest)
    q = g[:, :qpg * d].reshape((ng * qpg * d,) + rest)
    k = g[:, qpg * d:(qpg + 1) * d].reshape((ng * d,) + rest)
    v = g[:, (qpg + 1) * d:].reshape((ng * d,) + rest)
    return q.clone(), k.clone(), v.clone()


def mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: Optional[str] = None,
                max_shard_size_gb: float = 5.0, progress: bool = True, overwrite: bool = False) -> Path:
    """Export a megatron-sz checkpoint (root or ``iter_*`` folder) to an HF folder.

    Needs no process group (plain reads of the dist checkpoint). Inside a distributed
    job, rank 0 writes and every rank waits for it. The output appears atomically
    (written to a hidden temp folder beside it, then renamed).
    """
    import torch.distributed as tdist

    from megatron_sz.megatron.checkpoint import latest_checkpoint, read_meta
    from megatron_sz.megatron.model import resolve_dtype

    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir}",
                              fix="point at a folder written by megatron-sz (it has `latest` or iter_*/COMPLETE)")
    cfg_path = ckpt / "hf_config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{ckpt} has no hf_config.json", fix="convert from HF with megatron-sz convert hf-to-mcore")
    cfg = json.loads(cfg_path.read_text())
    arch = model_shape(cfg, where=str(cfg_path))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty", fix="choose a new folder or pass --overwrite")
    out_dtype = resolve_dtype(dtype) if dtype else None
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
        try:
            _export(ckpt, cfg, arch, tmp, out_dtype=out_dtype, max_bytes=int(max_shard_size_gb * 1024 ** 3),
                    progress=progress, meta=read_meta(ckpt))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
    return out


def _export(ckpt: Path, cfg: dict, arch, tmp: Path, *, out_dtype, max_bytes: int, progress: bool,
            meta: dict) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    writer = _ShardWriter(tmp, max_bytes)
    saved = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    L, V, F = arch.num_layers, arch.vocab_size, arch.ffn_hidden_size

    def need(key: str):
        if key not in saved:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint", where=str(ckpt),
                                  fix="the checkpoint is incomplete or of another architecture")
        return saved[key]

    def load(keys: dict[str, Optional[int]]) -> dict[str, torch.Tensor]:
        """Read whole tensors (layer=None) or one layer's slice of the stacked layer tensors."""
        request, offsets = {}, {}
        for key, layer in keys.items():
            m = need(key)
            shape = tuple(m.size)
            if layer is None:
                request[key] = torch.empty(shape, dtype=m.properties.dtype)
                offsets[key] = (0,) * len(shape)
            else:
                if shape[0] != L:
                    raise CheckpointError(f"tensor {key!r} stacks {shape[0]} layers, config says {L}",
                                          where=str(ckpt), fix="hf_config.json does not match the weights")
                request[key] = torch.empty((1,) + shape[1:], dtype=m.properties.dtype)
                offsets[key] = (layer,) + (0,) * (len(shape) - 1)
        read_region(ckpt, request, offsets)
        return {k: (v[0] if keys[k] is not None else v) for k, v in request.items()}

    if out_dtype is None and meta.get("params_dtype"):
        # one dtype for the whole HF folder: the model's params dtype (Megatron's torch
        # norms keep fp32 weights inside a bf16 model)
        from megatron_sz.megatron.model import resolve_dtype

        out_dtype = resolve_dtype(meta["params_dtype"])

    def emit(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{name!r} would get shape {list(t.shape)}, config implies {list(shape)}",
                                  where=str(ckpt), fix="hf_config.json does not match the weights")
        writer.add(name, t.to(out_dtype) if out_dtype is not None else t)

    H, d = arch.hidden_size, arch.head_dim
    nq, ng = arch.num_attention_heads * d, arch.num_query_groups * d
    steps = [("embed", None)] + [("layer", i) for i in range(L)] + [("final", None)]
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="export to HF", unit="part")
    for kind, i in steps:
        if kind == "embed":
            t = load({"embedding.word_embeddings.weight": None})["embedding.word_embeddings.weight"]
            if t.shape[0] < V:
                raise CheckpointError(f"tensor 'embedding.word_embeddings.weight' has {t.shape[0]} rows, "
                                      f"config vocab_size is {V}", where=str(ckpt))
            emit("model.embed_tokens.weight", t[:V].clone(), (V, H))
        elif kind == "layer":
            roles = _layer_keys(arch)
            got = {roles[k]: v for k, v in load({k: i for k in roles}).items()}
            p = f"model.layers.{i}."
            emit(p + "input_layernorm.weight", got["input_norm"], (H,))
            if got["qkv"].shape[0] != nq + 2 * ng:
                raise CheckpointError(f"tensor 'decoder.layers.self_attention.linear_qkv.weight' has "
                                      f"{got['qkv'].shape[0]} rows, config implies {nq + 2 * ng}", where=str(ckpt))
            q, k, v = _split_qkv(got["qkv"], arch)
            emit(p + "self_attn.q_proj.weight", q, (nq, H))
            emit(p + "self_attn.k_proj.weight", k, (ng, H))
            emit(p + "self_attn.v_proj.weight", v, (ng, H))
            if arch.qkv_bias:
                qb, kb, vb = _split_qkv(got["qkv_bias"], arch)
                emit(p + "self_attn.q_proj.bias", qb, (nq,))
                emit(p + "self_attn.k_proj.bias", kb, (ng,))
                emit(p + "self_attn.v_proj.bias", vb, (ng,))
            if arch.qk_layernorm:
                emit(p + "self_attn.q_norm.weight", got["q_norm"], (d,))
                emit(p + "self_attn.k_norm.weight", got["k_norm"], (d,))
            emit(p + "self_attn.o_proj.weight", got["o"], (H, nq))
            emit(p + "post_attention_layernorm.weight", got["post_norm"], (H,))
            fc1 = got["fc1"]
            emit(p + "mlp.gate_proj.weight", fc1[:F].clone(), (F, H))
            emit(p + "mlp.up_proj.weight", fc1[F:].clone(), (F, H))
            emit(p + "mlp.down_proj.weight", got["down"], (H, F))
        else:
            keys = {"decoder.final_layernorm.weight": None}
            if not arch.tie_word_embeddings:
                keys["output_layer.weight"] = None
            got = load(keys)
            emit("model.norm.weight", got["decoder.final_layernorm.weight"], (H,))
            if not arch.tie_word_embeddings:
                emit("lm_head.weight", got["output_layer.weight"][:V].clone(), (V, H))
    writer.finish()
    cfg_out = dict(cfg)
    final_dtype = str(out_dtype).replace("torch.", "") if out_dtype is not None else meta.get("params_dtype")
    if final_dtype:
        cfg_out["dtype"] = final_dtype
        cfg_out.pop("torch_dtype", None)
    cfg_out.setdefault("architectures", [FAMILIES[arch.model_type].architecture])
    (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
    for src in (ckpt.parent, ckpt):
        _copy_side_files(src, tmp)


# --------------------------------------------------------------------------- check


def _check_rank(rank: int, world: int, source: str, from_ckpt: bool, tp: int, pp: int,
                input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    from megatron.core import parallel_state

    from megatron_sz.megatron.checkpoint import load_checkpoint
    from megatron_sz.megatron.model import build_model, initialize_parallel, pipeline_forward_logits
    from megatron_sz.megatron.weights import load_hf_weights

    initialize_parallel(tp, pp)
    chunks = build_model(source, tp=tp, pp=pp, params_dtype=torch.float32, init_weights=False)
    if from_ckpt:
        load_checkpoint(source, chunks)
    else:
        load_hf_weights(chunks, source)
    for c in chunks:
        c.eval()
    logits = pipeline_forward_logits(chunks, input_ids)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        return logits
    return None


def megatron_logits(source: str | Path, input_ids: torch.Tensor, *, tp: int = 1, pp: int = 1,
                    from_ckpt: bool = False) -> torch.Tensor:
    """Megatron fp32 logits ``[b, s, V]`` for ``input_ids`` at TP/PP (spawns ranks if needed)."""
    import torch.distributed as tdist

    args = (str(source), from_ckpt, tp, pp, input_ids)
    if tdist.is_initialized():
        out = _check_rank(tdist.get_rank(), tdist.get_world_size(), *args)
        outs = [None] * tdist.get_world_size()
        tdist.all_gather_object(outs, out)
    elif tp * pp == 1:
        with _world():
            outs = [_check_rank(0, 1, *args)]
    else:
        from megatron_sz.dist import spawn

        outs = spawn(_check_rank, tp * pp, *args)
    return next(o for o in outs if o is not None)


def check(hf_dir: str | Path, tp: int = 1, pp: int = 1, tol: float = 1e-4, *, ckpt: str | Path | None = None,
          seq_len: Optional[int] = None, batch: int = 2, seed: int = 0) -> dict:
    """Compare HF (transformers, fp32) and Megatron logits; returns a result dict with ``ok``."""
    from transformers import AutoModelForCausalLM

    cfg, arch = validate_hf_folder(hf_dir)
    check_layout(arch, tp=tp, pp=pp)
    seq = int(seq_len or min(arch.max_position_embeddings, 128))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, arch.vocab_size, (batch, seq), generator=gen)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    rounded_to = None
    if ckpt is not None:
        from megatron_sz.megatron.checkpoint import latest_checkpoint, read_meta
        from megatron_sz.megatron.model import resolve_dtype

        found = latest_checkpoint(ckpt)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {ckpt}")
        stored = resolve_dtype(read_meta(found).get("params_dtype", "float32"))
        if stored != torch.float32:
            # A bf16 checkpoint holds rounded weights (norms may stay fp32, as Megatron's
            # torch norms do): round each HF weight like its stored Megatron tensor, still
            # computing in fp32, so the check tests the mapping and not the rounding.
            from torch.distributed.checkpoint import FileSystemReader

            saved = FileSystemReader(str(found)).read_metadata().state_dict_metadata
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    key = megatron_key_for_hf(name, tied=arch.tie_word_embeddings)
                    if key in saved and saved[key].properties.dtype != torch.float32:
                        p.copy_(p.to(saved[key].properties.dtype).float())
            rounded_to = str(stored).replace("torch.", "")
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    del hf
    source, from_ckpt = (ckpt, True) if ckpt is not None else (hf_dir, False)
    got = megatron_logits(source, ids, tp=tp, pp=pp, from_ckpt=from_ckpt).float()
    if got.shape != ref.shape:
        raise CheckpointError(f"logits shape {list(got.shape)} != HF {list(ref.shape)}")
    diff = (got - ref).abs()
    result = {
        "model_type": arch.model_type, "tp": tp, "pp": pp, "batch": batch, "seq_len": seq,
        "source": str(source), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "ref_max_abs_logit": float(ref.abs().max()),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "tol": tol, "hf_weights_rounded_to": rounded_to,
    }
    result["ok"] = result["max_abs_diff"] <= tol
    return result
