"""Recipes: one YAML file describes a whole co-evolution run.

One dataclass per concern, every field documented, validated at load time:

* an unknown key names the key, its path and the closest valid key;
* a wrong type or an out-of-range value names the field path and what was expected;
* nothing is submitted or trained before the whole recipe validates.

``load_recipe(path)`` returns a ``Recipe``. Relative paths inside a recipe are resolved
against the recipe file's folder (``Recipe.resolve_path``), so a recipe and its
tokenizer/seed files can move together.

To add a field: add it to the right dataclass with a default and a docstring line, and
validate it in that class's ``check()`` if it has a range. Loading handles the rest.
"""
from __future__ import annotations

import dataclasses
import re
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_sz.errors import RecipeError

# --------------------------------------------------------------------------- sections


@dataclass
class ModelSpec:
    """Which network a role trains or serves.

    Sources: ``hf_path`` (an HF checkpoint folder: config.json, weights, tokenizer) and/or
    ``config``: an inline HF-style config dict for tiny random models (e.g.
    ``{architectures: [Qwen3ForCausalLM], hidden_size: 64, ...}``), or the path of a
    config JSON (``models/qwen3-8b.json``, resolved relative to the recipe, then the
    packaged recipes/ folder). ``load_recipe`` replaces a path by the dict it holds, so
    after loading ``config`` is always a dict or None (``config_path`` keeps the file).
    With both, ``hf_path`` wins wherever its config.json exists; ``config`` then only
    describes the architecture for ``megatron-sz plan`` before the checkpoint is on disk.
    ``mcore_checkpoint`` optionally starts from a converted Megatron checkpoint.
    """

    hf_path: str | None = None
    config: dict | str | None = None
    mcore_checkpoint: str | None = None
    tokenizer: str | None = None  # HF folder or SentencePiece .model; default: hf_path / recipe tokenizer
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # training/serving dtype on GPU; CPU always runs fp32
    make_vocab_size_divisible_by: int = 128
    config_path: str | None = field(default=None, metadata={"internal": True})  # set by load_recipe

    def check(self) -> None:
        if self.hf_path is None and self.config is None:
            raise ValueError("set 'hf_path' (HF checkpoint folder) or 'config' (inline HF config or a config JSON path)")
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError("field 'make_vocab_size_divisible_by' must be >= 1")

    def resolve_config(self, recipe: "Recipe", *, where: str) -> None:
        """Load ``config`` given as a path (relative to the recipe) into a dict."""
        import json

        if not isinstance(self.config, str):
            return
        path = recipe.resolve_path(self.config)
        if path is None or not path.is_file():  # a packaged config, e.g. models/qwen3-8b.json
            from megatron_sz.paths import resolve_resource
            path = resolve_resource(self.config, "recipes")
        if not path.is_file():
            raise RecipeError(f"{where}.config: model config file not found: {self.config}", where=recipe.source,
                              fix="give a path relative to the recipe file, e.g. models/qwen3-8b.json")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecipeError(f"invalid JSON in model config: {exc.msg}", where=f"{path}:{exc.lineno}") from None
        if not isinstance(cfg, dict):
            raise RecipeError(f"{where}.config: {path} must hold a JSON object", where=recipe.source)
        self.config, self.config_path = cfg, str(path)

    def hf_config(self, recipe: "Recipe | None" = None, *, where: str = "model") -> dict:
        """The HF config dict: ``hf_path``/config.json if it exists, else ``config``."""
        import json

        if self.hf_path is not None:
            root = recipe.resolve_path(self.hf_path) if recipe is not None else Path(self.hf_path).expanduser()
            cfg_file = root / "config.json" if root is not None else None
            if cfg_file is not None and cfg_file.is_file():
                return json.loads(cfg_file.read_text(encoding="utf-8"))
            if not isinstance(self.config, dict):
                raise RecipeError(f"{where}.hf_path: no config.json in {root}",
                                  fix="download/copy the checkpoint there, or add 'config: models/<name>.json'")
        if isinstance(self.config, str):
            if recipe is None:
                raise RecipeError(f"{where}.config is a path; load the recipe with load_recipe to resolve it")
            self.resolve_config(recipe, where=where)
        if self.config is None:
            raise RecipeError(f"{where}: no model given", fix="set 'hf_path' or 'config'")
        return dict(self.config)


@dataclass
class ParallelSpec:
    """Megatron parallel layout of a training job. dp = world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    nodes: int = 1
    gpus_per_node: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True  # Megatron's DistributedOptimizer (state sharded over DP), CPU and GPU
    recompute: Literal["none", "selective", "full"] = "none"
    virtual_pp: int | None = None

    def check(self) -> None:
        for name in ("tp", "pp", "nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"field {name!r} must be >= 1")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("field 'sequence_parallel' needs tp >= 2")
        if self.virtual_pp is not None and (self.virtual_pp < 1 or (self.virtual_pp > 1 and self.pp < 2)):
            raise ValueError("field 'virtual_pp' must be >= 1, and > 1 only with pp >= 2")
        world = self.nodes * self.gpus_per_node
        if world % (self.tp * self.pp):
            raise ValueError(f"world size {world} (nodes*gpus_per_node) is not divisible by "
                             f"tp*pp = {self.tp * self.pp}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


@dataclass
class OptimSpec:
    """AdamW with linear warm-up then decay."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    clip_grad: float = 1.0

    def check(self) -> None:
        if self.lr <= 0:
            raise ValueError("field 'lr' must be > 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError("field 'min_lr' must be in [0, lr]")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise ValueError("fields 'warmup_steps' and 'clip_grad' must be >= 0 (clip_grad 0: no clipping)")


@dataclass
class TrainSpec:
    """Options every training job shares."""

    max_length: int = 2048
    micro_batch_size: int = 1
    global_batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None
    batching: Literal["length_sorted", "packed", "none"] = "length_sorted"
    # packed: tokens per packed row (one row = one micro-batch; several items per row, each
    # attending only within itself). None: max_length per sequence of an item (DPO: 2x).
    pack_length: int | None = None
    # Megatron's gradient-accumulation fusion for the LM head: the fused loss adds dW straight
    # into the weight's fp32 main_grad (no [V, H] grad tensor). Not used with fp16 (dynamic
    # loss scale) or outside training; false: the loss returns dW and DDP adds it.
    gradient_accumulation_fusion: bool = True
    overlong: Literal["truncate", "drop"] = "truncate"
    save_interval: int = 0  # 0: only at the end (and on preemption)
    log_interval: int = 1
    eval_fraction: float = 0.0  # held-out share of the input file for per-step eval lines
    eval_interval: int = 0  # steps between held-out evals (0: only at the start and the end)
    sort_window: int = 8  # length_sorted: sort items within windows of this many global batches
    pad_to_multiple_of: int = 8  # pad each micro-batch's sequence length to a multiple of this
    seed: int | None = None  # data order + init seed; None: the recipe's top-level seed
    export_hf: bool = True
    # "last": a job keeps only its newest checkpoint (an earlier interval or preemption save is
    # deleted once a newer one is complete), and the final one of a finished job holds the
    # model only: no optimizer state, which nothing reads once the job is done (the next stage
    # starts from the weights). "all": every checkpoint, with optimizer state (issue 20).
    keep_checkpoints: Literal["last", "all"] = "last"
    optim: OptimSpec = field(default_factory=OptimSpec)

    def check(self) -> None:
        if self.max_length < 8:
            raise ValueError("field 'max_length' must be >= 8")
        if self.micro_batch_size < 1 or self.global_batch_size < self.micro_batch_size:
            raise ValueError("need 1 <= micro_batch_size <= global_batch_size")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("field 'global_batch_size' must be a multiple of 'micro_batch_size'")
        if not (0.0 <= self.eval_fraction < 1.0):
            raise ValueError("field 'eval_fraction' must be in [0, 1)")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("fields 'epochs' and 'max_steps' must be >= 1")
        if self.sort_window < 1 or self.pad_to_multiple_of < 1:
            raise ValueError("fields 'sort_window' and 'pad_to_multiple_of' must be >= 1")
        if self.pack_length is not None:
            if self.batching != "packed":
                raise ValueError("field 'pack_length' is only used with batching: packed; remove it or set "
                                 "batching: packed")
            if self.pack_length < self.max_length:
                raise ValueError(f"field 'pack_length' ({self.pack_length}) must be >= max_length "
                                 f"({self.max_length}): an item must fit one packed row")


@dataclass
class SFTSpec(TrainSpec):
    """Solver SFT warm-up: NLL on reference solutions (``normalization`` as in WSFT)."""

    normalization: Literal["sum", "sequence", "token"] = "token"


@dataclass
class DPOSpec(TrainSpec):
    """Solver online DPO. All options of ``fused_linear_dpo_loss``."""

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    label_smoothing: float = 0.0
    nll_alpha: float = 0.0
    reference_free: bool = False
    simpo_gamma: float = 0.5

    def check(self) -> None:
        TrainSpec.check(self)
        if self.beta <= 0:
            raise ValueError("field 'beta' must be > 0")
        if not (0.0 <= self.label_smoothing < 0.5):
            raise ValueError("field 'label_smoothing' must be in [0, 0.5)")


@dataclass
class WSFTSpec(TrainSpec):
    """Generator weighted SFT with U(s) = exp(-(s-mu)^2 / (2 sigma^2))."""

    mu: float = 0.5
    sigma: float = 0.2
    normalization: Literal["sum", "sequence", "token"] = "sum"
    # U(s): "gaussian" (the paper), or "linear": max(0, 1 - |s - mu| / max(mu, 1 - mu)),
    # the triangle with the same peak (an ablation knob, pairs.linear_weight).
    weighting: Literal["gaussian", "linear"] = "gaussian"

    def check(self) -> None:
        TrainSpec.check(self)
        if self.sigma <= 0:
            raise ValueError("field 'sigma' must be > 0")


@dataclass
class PGSpec(TrainSpec):
    """Policy-gradient RL on scored rollouts (``fused_linear_pg_loss``): GRPO, Dr. GRPO,
    REINFORCE++, TRR++ (Absolute Zero), ADPO (Agent0). ``epochs`` are the PPO epochs over
    one stage's rollouts and ``global_batch_size`` is the PPO mini-batch (one optimizer
    step each); every step clips against the stage's starting (behaviour) policy."""

    estimator: Literal["grpo", "grpo-no-std", "reinforce++", "trr++", "adpo"] = "grpo"
    advantage_eps: float = 1e-6  # added to the std of a group / key
    adpo_min_scale: float = 0.5  # ADPO's m in s(p) = m + (1 - m) clip((p - 0.3)/0.5, 0, 1)
    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.2  # ratio upper bound 1 + clip_high (ADPO: the base eps of eps_high(p))
    clip_c: float | None = None  # dual clip for negative advantages (> 1), e.g. 3
    kl_coef: float = 0.0  # KL to the stage's starting policy
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0  # entropy bonus (the loss subtracts coef x entropy)
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                         "seq-mean-token-sum-norm"] = "token-mean"
    norm_constant: float | None = None  # seq-mean-token-sum-norm's constant (None: padded length)
    temperature: float = 1.0  # the rollouts' sampling temperature (log-probs at the same one)
    old_logps: Literal["recompute", "data"] = "recompute"  # data: the rollouts carry them

    def check(self) -> None:
        TrainSpec.check(self)
        if not 0 <= self.clip_low < 1:
            raise ValueError("field 'clip_low' must be in [0, 1)")
        if self.clip_high <= 0:
            raise ValueError("field 'clip_high' must be > 0")
        if self.clip_c is not None and self.clip_c <= 1:
            raise ValueError("field 'clip_c' must be > 1 (or null: no dual clip)")
        if self.kl_coef < 0:
            raise ValueError("field 'kl_coef' must be >= 0")
        if not 0 <= self.adpo_min_scale <= 1:
            raise ValueError("field 'adpo_min_scale' must be in [0, 1]")
        if self.temperature <= 0 or self.advantage_eps <= 0:
            raise ValueError("fields 'temperature' and 'advantage_eps' must be > 0")
        if self.norm_constant is not None and self.norm_constant <= 0:
            raise ValueError("field 'norm_constant' must be > 0")


@dataclass
class SamplingSpec:
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 2048
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError("field 'temperature' must be >= 0")
        if not (0 < self.top_p <= 1):
            raise ValueError("field 'top_p' must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("field 'max_tokens' must be >= 1")


@dataclass
class BackendSpec:
    """An inference backend: vLLM offline batch, OpenAI-compatible HTTP, or local CPU."""

    kind: Literal["vllm", "openai", "local"] = "local"
    model: str | None = None  # served model name (openai) or checkpoint path (vllm/local)
    endpoints: list[str] = field(default_factory=list)  # base URLs, e.g. http://host:8000/v1
    api: Literal["chat", "completions"] = "chat"
    api_key: str | None = None  # or env OPENAI_API_KEY
    concurrency: int = 32
    timeout_s: float = 600.0
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float = 0.9  # vllm
    max_model_len: int | None = None  # vllm
    dtype: str = "auto"  # vllm: auto, bfloat16, float16
    balance: Literal["least_loaded", "round_robin"] = "least_loaded"  # openai: endpoint choice
    cooldown_s: float = 5.0  # openai: first cool-down of a failing endpoint (doubles per failure)
    batch_size: int = 32  # local: sequences per forward batch
    chunk_size: int = 512  # vllm: requests per durable chunk (a killed job redoes one chunk)

    def check(self) -> None:
        if self.kind == "openai" and not self.endpoints:
            raise ValueError("kind 'openai' needs at least one URL in 'endpoints'")
        if self.concurrency < 1:
            raise ValueError("field 'concurrency' must be >= 1")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_base_s < 0:
            raise ValueError("fields 'timeout_s' > 0, 'max_retries' >= 0, 'backoff_base_s' >= 0 required")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("fields 'batch_size' and 'chunk_size' must be >= 1")


@dataclass
class RolloutSpec:
    """How a role samples: k samples per prompt, sharded for SLURM arrays."""

    k: int = 8
    shards: int = 1
    prompt_template: str | None = None  # None: the packaged template; else a .txt path or text with {problem}
    chat: bool = False  # send the prompt as one user chat message (instruct models) instead of raw text
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    backend: BackendSpec = field(default_factory=BackendSpec)

    def check(self) -> None:
        if self.k < 1 or self.shards < 1:
            raise ValueError("fields 'k' and 'shards' must be >= 1")


@dataclass
class SolverRole:
    model: ModelSpec = field(default_factory=ModelSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    sft: SFTSpec = field(default_factory=SFTSpec)
    dpo: DPOSpec = field(default_factory=DPOSpec)
    pg: PGSpec = field(default_factory=PGSpec)  # megatron-sz train policy-gradient
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    # The round's solver update (Socratic-Zero): "dpo" (the paper), or "sft": SFT on the
    # winners of the same pairs, with the dpo section's batch/steps/optimizer (two sequences
    # per pair, so global_batch_size is doubled to train as many tokens); an ablation knob.
    round_objective: Literal["dpo", "sft"] = "dpo"


@dataclass
class GeneratorRole:
    model: ModelSpec = field(default_factory=ModelSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    wsft: WSFTSpec = field(default_factory=WSFTSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    enabled: bool = True


@dataclass
class TeacherRole:
    """The frozen teacher: ``symbolic`` (no LLM, the embedded default) or ``llm``."""

    kind: Literal["symbolic", "llm"] = "symbolic"
    backend: BackendSpec = field(default_factory=BackendSpec)
    judge: Literal["never", "undecided", "always"] = "undecided"  # when the LLM judge runs
    judge_spot_check: float = 0.0  # share of rule-decided answers re-checked by the judge
    verify_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.1, max_tokens=512))
    refine_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.7, max_tokens=4096))
    self_verify_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.1, max_tokens=4096))
    max_parse_retries: int = 3
    refinements_per_failure: int = 1
    templates_dir: str | None = None  # override the packaged prompt templates
    shards: int = 1
    seed: int = 0  # symbolic teacher
    families: list[str] = field(default_factory=list)  # symbolic teacher: problem families (empty: all)


@dataclass
class CurriculumSpec:
    # "co-evolve": the paper's adaptive curriculum. "static": the paper's static-augmentation
    # control: the teacher writes all problems up front from the seeds (no solver feedback),
    # and every round's solver update is SFT on their reference solutions (same step budget).
    mode: Literal["co-evolve", "static"] = "co-evolve"
    replay_ratio: float = 0.25  # share of historical (non-new) problems in a round's active set
    max_active: int | None = None  # cap on problems rolled out per round
    near_dup_threshold: float = 0.9  # Jaccard similarity of word 3-grams above which a problem is a duplicate
    mastered_threshold: float = 1.0  # success rate at/above which a problem is mastered
    too_hard_threshold: float = 0.0  # success rate at/below which a problem is deferred
    recheck_every: int = 2  # rounds between re-checks of deferred problems
    max_refinements_per_round: int | None = None
    contamination_files: list[str] = field(default_factory=list)  # benchmark files to filter against
    contamination_ngram: int = 13

    def check(self) -> None:
        if not (0.0 <= self.replay_ratio <= 1.0):
            raise ValueError("field 'replay_ratio' must be in [0, 1]")
        if not (0.0 < self.near_dup_threshold <= 1.0):
            raise ValueError("field 'near_dup_threshold' must be in (0, 1]")
        if not (0.0 <= self.too_hard_threshold < self.mastered_threshold <= 1.0):
            raise ValueError("need 0 <= too_hard_threshold < mastered_threshold <= 1")
        if self.recheck_every < 1 or self.contamination_ngram < 1:
            raise ValueError("fields 'recheck_every' and 'contamination_ngram' must be >= 1")
        if self.max_active is not None and self.max_active < 1:
            raise ValueError("field 'max_active' must be >= 1 (or null: no cap)")


@dataclass
class EvalSpec:
    enabled: bool = False
    heldout_file: str | None = None  # problems for per-round solver accuracy
    heldout_size: int = 64  # when generated (symbolic) instead of read from a file
    benchmarks: list[str] = field(default_factory=list)  # benchmark files for `megatron-sz eval`
    k: int = 1
    sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.0, max_tokens=256))

    def check(self) -> None:
        if self.k < 1 or self.heldout_size < 1:
            raise ValueError("fields 'k' and 'heldout_size' must be >= 1")


@dataclass
class SlurmRoleSpec:
    """SLURM resources of one role's jobs."""

    partition: str = "batch"
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: str = "04:00:00"
    account: str | None = None
    qos: str | None = None
    env_setup: list[str] = field(default_factory=list)  # shell lines run before the step (module load, venv, ...)
    container: str | None = None  # container image (pyxis --container-image) for this role
    # Interpreter of this role's jobs (default: slurm.python; see SlurmSpec.python).
    python: str | None = None
    array_throttle: int = 4  # at most this many array tasks at once (%N)
    extra_sbatch: list[str] = field(default_factory=list)  # raw '#SBATCH' option lines, e.g. "--exclusive"

    def check(self) -> None:
        import re

        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1 or self.array_throttle < 1:
            raise ValueError("need nodes >= 1, gpus_per_node >= 0, cpus_per_task >= 1, array_throttle >= 1")
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|\d+|UNLIMITED|INFINITE", self.time):
            raise ValueError(f"field 'time' is {self.time!r}; expected SLURM's [D-]HH:MM:SS or minutes")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise ValueError(f"field 'mem' is {self.mem!r}; expected e.g. 64G or 4000M")


@dataclass
class SlurmSpec:
    solver: SlurmRoleSpec = field(default_factory=lambda: SlurmRoleSpec(partition="solver"))
    teacher: SlurmRoleSpec = field(default_factory=lambda: SlurmRoleSpec(partition="teacher"))
    generator: SlurmRoleSpec = field(default_factory=lambda: SlurmRoleSpec(partition="generator"))
    signal_seconds: int = 120  # --signal=B:USR1@N: checkpoint this long before the time limit
    requeue: bool = True
    # Interpreter on the compute nodes. Default (null): the absolute path of the interpreter
    # that ran `submit`, unless a role names its own environment (env_setup or container:
    # then `python3` as that environment puts it on PATH). Jobs that picked up whatever
    # python3 was on the node's PATH failed with "No module named megatron_sz.kernels"
    # while submit reported success (issue 20).
    python: str | None = None
    # Before submitting, check that each role's environment imports megatron_sz: "local"
    # runs env_setup + the interpreter on this machine (container roles are skipped),
    # "srun" runs the same check as a one-task job on each role's partition, "none" skips.
    preflight: Literal["local", "srun", "none"] = "local"
    chain: Literal["all", "round"] = "all"  # submit every round's chain at once (dependencies), or one round per submit

    def check(self) -> None:
        if self.signal_seconds < 0:
            raise ValueError("field 'signal_seconds' must be >= 0 (0: no --signal)")
        for name, value in [("python", self.python)] + [(f"{r}.python", getattr(self, r).python)
                                                        for r in ("solver", "teacher", "generator")]:
            if value is not None and not value.strip():
                raise ValueError(f"field '{name}' is empty; leave it out to use the interpreter that runs submit")


@dataclass
class TokenizerSpec:
    """Tokenizer for roles without their own HF tokenizer (tiny models).

    ``kind: sentencepiece`` with ``train: true`` trains a small model from the seed file
    and the symbolic teacher's text into the run directory, with no downloads.
    """

    kind: Literal["hf", "sentencepiece"] = "hf"
    path: str | None = None  # HF folder, SentencePiece .model, or a folder saved by megatron_sz.tokenizer
    train: bool = False
    vocab_size: int = 512  # target size when training (may come out smaller on little text)

    def check(self) -> None:
        if self.train and self.kind != "sentencepiece":
            raise ValueError("field 'train' needs kind 'sentencepiece' (HF tokenizers come with the checkpoint)")
        from megatron_sz.tokenizer import MIN_TRAINED_VOCAB

        if self.train and self.vocab_size < MIN_TRAINED_VOCAB:
            raise ValueError(f"field 'vocab_size' must be >= {MIN_TRAINED_VOCAB} (256 byte pieces + 4 specials "
                             "+ 95 printable characters and whitespace + newline)")


@dataclass
class WarmupSpec:
    """Round 0's solver SFT warm-up data (the paper: essential, AIME-24 11.98 -> 28.02).

    One source: ``data_file`` (JSONL problems with reference solutions), or
    ``symbolic_problems`` sampled from the symbolic teacher, or (neither) the seed problems.
    ``difficulty`` is the symbolic [low, high] level range, also used for sampled seeds
    and the sampled held-out set."""

    enabled: bool = True  # false: no warm-up (the sft stage exports the initial weights untrained)
    data_file: str | None = None
    symbolic_problems: int = 0
    difficulty: list[int] = field(default_factory=lambda: [1, 2])
    families: list[str] | None = None  # symbolic families for seeds/warm-up/held-out (default: all)

    def check(self) -> None:
        if self.symbolic_problems < 0:
            raise ValueError("field 'symbolic_problems' must be >= 0")
        if len(self.difficulty) != 2 or not (1 <= self.difficulty[0] <= self.difficulty[1] <= 5):
            raise ValueError("field 'difficulty' must be [low, high] with 1 <= low <= high <= 5")


@dataclass
class AZRSpec:
    """Absolute Zero (``system: absolute-zero``): one model proposes and solves deduction,
    abduction and induction tasks checked by running Python in the sandbox.

    Per round and task type: ``proposals`` proposer samples, each conditioned on
    ``references`` tasks sampled from that type's buffer; every valid proposal is solved
    ``solves`` times (its learnability r = 1 - acc if 0 < acc < 1, else 0), and the solver
    also solves ``solver_batch`` tasks drawn from the buffer. Buffers start from
    ``seed_file`` (AzrTask JSONL) or the zero triplet ``def f(a): return a``. Round 0
    warms the model up by SFT on ``warmup_programs`` template programs (0: none) and
    evaluates on ``heldout_per_type`` template triplets per type."""

    task_types: list[str] = field(default_factory=lambda: ["deduction", "abduction", "induction"])
    proposals: int = 64  # proposer samples per task type and round (the paper's batch: 64)
    references: int = 6  # K buffer tasks in a deduction/abduction proposer prompt
    solves: int = 8  # n solver samples per valid proposal (learnability)
    solver_batch: int = 0  # extra buffer tasks per type the solver solves (training only)
    induction_inputs: int = 10  # inputs an induction proposal writes (half shown, half hidden)
    seed_file: str | None = None  # AzrTask JSONL to seed the buffers (default: the zero triplet)
    timeout_s: float = 5.0  # sandbox wall-clock limit of one execution
    determinism_runs: int = 2  # runs that must agree for a program to be deterministic
    validate_shards: int = 1  # sandbox array width of validate
    max_program_chars: int = 2000  # longer proposed programs are malformed
    warmup_programs: int = 0  # template programs in round 0's SFT corpus (0: no warm-up)
    heldout_per_type: int = 32  # held-out template triplets per type (solver accuracy per round)
    propose_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=1.0, max_tokens=1024))
    solve_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=1.0, max_tokens=1024))
    eval_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.0, max_tokens=512))

    def check(self) -> None:
        bad = [t for t in self.task_types if t not in ("deduction", "abduction", "induction")]
        if bad or not self.task_types or len(set(self.task_types)) != len(self.task_types):
            raise ValueError(f"field 'task_types' must list distinct types from deduction, abduction, induction; "
                             f"got {self.task_types}")
        for name in ("proposals", "references", "solves", "validate_shards", "heldout_per_type"):
            if getattr(self, name) < 1:
                raise ValueError(f"field {name!r} must be >= 1")
        if self.solver_batch < 0 or self.warmup_programs < 0:
            raise ValueError("fields 'solver_batch' and 'warmup_programs' must be >= 0")
        if self.induction_inputs < 2:
            raise ValueError("field 'induction_inputs' must be >= 2 (at least one shown and one hidden pair)")
        if self.determinism_runs < 2:
            raise ValueError("field 'determinism_runs' must be >= 2 (two runs must agree)")
        if self.timeout_s <= 0 or self.max_program_chars < 16:
            raise ValueError("fields 'timeout_s' > 0 and 'max_program_chars' >= 16 required")


@dataclass
class PromptCoTJudgeSpec:
    """One PromptCoT judge: a name (its scores are keyed by it) and, for an LLM teacher, the
    backend it runs on (null: the teacher's ``backend``). The symbolic teacher's exact
    checker serves every judge."""

    name: str = "judge"
    backend: BackendSpec | None = None
    sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.0, max_tokens=512))

    def check(self) -> None:
        if not self.name.strip() or "#" in self.name:
            raise ValueError(f"field 'name' is {self.name!r}; give a non-empty name without '#'")


@dataclass
class PromptCoTSpec:
    """PromptCoT (``system: promptcot``): concepts -> rationale -> problem, then rejection sampling.

    Round 0 extracts concepts from ``problems_file`` (default: the run's seeds), has the
    teacher write a rationale per problem, and trains the generator by SFT (``sft``, weight
    1) on concepts -> rationale -> problem. Every round samples ``requests_per_round``
    concept sets x ``generator.rollout.k`` candidates, has every judge score them on the
    rubric (1..``perfect_score``), keeps those all judges rate perfect and retrains the
    generator by WSFT (``generator.wsft``) with weight 1 on kept and 0 on the rest. The
    kept problems, deduplicated (``near_dup_threshold``) and checked against held-out and
    benchmark problems (``contamination_threshold``, plus the held-out rule), are the
    synthesized set. ``downstream``: in the last round the teacher solves the set, a solver
    trains on it by SFT (``solver.sft``) and the quality report measures it."""

    problems_file: str | None = None  # any Problem JSONL to extract concepts from (null: the seeds)
    concepts_per_problem: int = 5  # what the LLM teacher is asked for
    difficulties: list[int] = field(default_factory=list)  # target levels of requests (empty: each set's own)
    requests_per_round: int = 64  # concept sets asked for per round (each gets generator.rollout.k samples)
    generator_template: str = "Concepts: {concepts}\nDifficulty: {difficulty}\nRationale:"
    judges: list[PromptCoTJudgeSpec] = field(default_factory=lambda: [PromptCoTJudgeSpec(name="judge_a"),
                                                                      PromptCoTJudgeSpec(name="judge_b")])
    perfect_score: int = 5  # the rubric's scale: 1..perfect_score per criterion
    sft: WSFTSpec = field(default_factory=WSFTSpec)  # the generator's SFT (every weight 1)
    concept_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.2, max_tokens=512))
    rationale_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.7,
                                                                                   max_tokens=1024))
    solve_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.1, max_tokens=2048))
    near_dup_threshold: float = 0.9  # Jaccard of word 3-grams: a near duplicate within the synthesized set
    contamination_threshold: float = 0.8  # Jaccard to a held-out / benchmark problem: dropped
    downstream: bool = False  # last round: teacher solutions, solver SFT, quality report
    reference_solver: str | None = None  # HF folder whose success rate measures difficulty (null: the SFT solver)
    reference_k: int = 4  # samples per problem for the reference solver's success rate

    def check(self) -> None:
        if self.concepts_per_problem < 1 or self.requests_per_round < 1 or self.reference_k < 1:
            raise ValueError("fields 'concepts_per_problem', 'requests_per_round' and 'reference_k' must be >= 1")
        if any(not 1 <= d <= 5 for d in self.difficulties):
            raise ValueError(f"field 'difficulties' {self.difficulties} must hold levels in 1..5")
        if "{concepts}" not in self.generator_template:
            raise ValueError("field 'generator_template' needs a {concepts} placeholder")
        names = [j.name for j in self.judges]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"field 'judges' needs at least one judge, with distinct names; got {names}")
        if self.perfect_score < 2:
            raise ValueError("field 'perfect_score' must be >= 2 (the rubric's 1..N scale)")
        for name in ("near_dup_threshold", "contamination_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"field {name!r} must be in (0, 1]")


@dataclass
class WandbSpec:
    project: str | None = None  # set to log online; otherwise WANDB_MODE=offline
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class Agent0Spec:
    """Agent0 (``system: agent0``): the curriculum agent (recipe role ``generator``) proposes
    tasks, the tool-using executor (role ``solver``) samples each ``samples`` times; see
    ``megatron_sz/systems/agent0.py``. The executor trains with ``solver.pg`` (ADPO), the
    curriculum agent with ``curriculum_pg`` (GRPO) on ``generator.model``/``parallel``."""

    prompts: int = 16  # curriculum prompts per round (one GRPO group each)
    group_size: int = 4  # proposals sampled per prompt
    topics: list[str] = field(default_factory=list)  # topic hints cycled over the prompts (default: warmup.families)
    curriculum_template: str = "Write a new {topic} problem.\nProblem:"
    curriculum_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=1.0, max_tokens=64))
    curriculum_pg: PGSpec = field(default_factory=PGSpec)  # GRPO on the proposals
    samples: int = 10  # m: executor samples per task (majority vote, self-consistency p)
    keep_low: float = 0.3  # the executor trains on tasks with keep_low <= p <= keep_high
    keep_high: float = 0.8
    max_tool_turns: int = 4  # tool calls per trajectory
    tool_timeout_s: float = 5.0
    tool_output_chars: int = 1024  # observation cap
    tool_reward: float = 0.05  # per tool call (mean over the executor's samples) ...
    tool_reward_cap: int = 4  # ... counted up to this many calls
    bleu_threshold: float = 0.5  # questions with BLEU distance below this share a cluster
    invalid_reward: float = -1.0
    max_question_chars: int = 400
    warmup_traces: int = 96  # round 0: tool-use traces (problem, code, real sandbox output, boxed answer)
    warmup_proposals: int = 64  # round 0: examples of the proposal format for the shared base model

    def check(self) -> None:
        if self.prompts < 1 or self.group_size < 1 or self.samples < 1:
            raise ValueError("fields 'prompts', 'group_size' and 'samples' must be >= 1")
        if not 0.0 <= self.keep_low <= self.keep_high <= 1.0:
            raise ValueError("need 0 <= keep_low <= keep_high <= 1")
        if self.max_tool_turns < 0 or self.tool_reward_cap < 0 or self.tool_output_chars < 16:
            raise ValueError("need max_tool_turns >= 0, tool_reward_cap >= 0, tool_output_chars >= 16")
        if self.tool_timeout_s <= 0 or not 0.0 < self.bleu_threshold <= 1.0:
            raise ValueError("need tool_timeout_s > 0 and 0 < bleu_threshold <= 1")
        if "{topic}" not in self.curriculum_template:
            raise ValueError("field 'curriculum_template' must contain {topic}")


@dataclass
class Recipe:
    """A whole co-evolution run."""

    name: str = "run"
    system: str = "socratic-zero"  # the self-evolving system this recipe runs (megatron-sz systems)
    seed: int = 1234
    rounds: int = 3
    run_dir: str | None = None  # default: runs/<name>
    seeds_file: str = "seeds/socratic100.jsonl"
    seeds_from_teacher: int = 0  # >0: sample this many seeds from the symbolic teacher instead
    warmup: WarmupSpec = field(default_factory=WarmupSpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    solver: SolverRole = field(default_factory=SolverRole)
    teacher: TeacherRole = field(default_factory=TeacherRole)
    generator: GeneratorRole = field(default_factory=GeneratorRole)
    curriculum: CurriculumSpec = field(default_factory=CurriculumSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    wandb: WandbSpec = field(default_factory=WandbSpec)
    azr: AZRSpec = field(default_factory=AZRSpec)  # system: absolute-zero
    promptcot: PromptCoTSpec = field(default_factory=PromptCoTSpec)  # system: promptcot
    agent0: Agent0Spec = field(default_factory=Agent0Spec)  # system: agent0
    # Set by load_recipe, not by the YAML.
    source: str | None = field(default=None, metadata={"internal": True})

    def check(self) -> None:
        import difflib

        from megatron_sz.systems import SYSTEMS

        if self.rounds < 0:
            raise ValueError("field 'rounds' must be >= 0")
        if self.system not in SYSTEMS:
            close = difflib.get_close_matches(self.system, list(SYSTEMS), n=1)
            raise ValueError(f"field 'system' is {self.system!r}; "
                             + (f"did you mean {close[0]!r}? " if close else "")
                             + f"registered systems: {', '.join(SYSTEMS)}")

    def resolve_path(self, value: str | None) -> Path | None:
        """Resolve a path written in the recipe: absolute, else relative to the recipe file,
        else relative to the working directory, else a packaged resource."""
        if value is None:
            return None
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        if self.source:
            cand = Path(self.source).resolve().parent / p
            if cand.exists():
                return cand
        if p.exists():
            return p.resolve()
        from megatron_sz.paths import RESOURCES, resolve_resource
        if p.parts and p.parts[0] in RESOURCES:
            return resolve_resource(p, p.parts[0]).resolve()
        return p.resolve()


# --------------------------------------------------------------------------- loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# Line of each dotted key ("solver.dpo.beta", "slurm.solver.env_setup[0]") of the recipe file
# being loaded, so a bad value is reported as FILE:LINE (issue 20). Set by load_recipe only.
_KEY_LINES: dict[str, int] = {}
_KEY_LINES_FILE: str | None = None


def _yaml_key_lines(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line, from the YAML node tree (plain safe_load forgets lines)."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                sub = f"{path}.{k.value}" if path else str(k.value)
                out.setdefault(sub, k.start_mark.line + 1)
                walk(v, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                sub = f"{path}[{i}]"
                out.setdefault(sub, v.start_mark.line + 1)
                walk(v, sub)

    walk(root, "")
    return out


def _at(where: str, path: str) -> str:
    """``where`` with the recipe line of ``path`` (or of its closest written parent) appended."""
    if where != _KEY_LINES_FILE or not _KEY_LINES:
        return where
    while path:
        if path in _KEY_LINES:
            return f"{where}:{_KEY_LINES[path]}"
        path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if re.search(r"[.\[]", path) else ""
    return where


def _convert(value: Any, hint: Any, path: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for h in args:
            if h is type(None):
                continue
            try:
                return _convert(value, h, path, where)
            except RecipeError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_txt = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{path} is {value!r}; expected one of {', '.join(repr(a) for a in args)}{hint_txt}",
                              where=_at(where, path))
        return value
    if _is_dataclass_type(hint):
        return from_dict(hint, value, path=path, where=where)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path} must be true or false, got {value!r}", where=_at(where, path))
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path} must be an integer, got {value!r}", where=_at(where, path))
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-6 without a dot as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise RecipeError(f"{path} must be a number, got {value!r}", where=_at(where, path))
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise RecipeError(f"{path} must be a string, got {value!r}", where=_at(where, path))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path} must be a list, got {value!r}", where=_at(where, path))
        (item,) = args or (Any,)
        return [_convert(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path} must be a mapping, got {value!r}", where=_at(where, path))
        return dict(value)
    return value


def from_dict(cls: type, data: Any, *, path: str = "", where: str = "recipe") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    label = path or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{label} must be a mapping of keys to values, got {type(data).__name__}", where=_at(where, path))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            suggestion = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
            raise RecipeError(f"unknown key {key_path!r}", where=_at(where, key_path), fix=suggestion)
        kwargs[key] = _convert(value, hints[key], key_path, where)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            # "field 'time' is ...": point at that field's line when the file has it
            m = re.search(r"field '(\w+)'", str(exc))
            at = _at(where, f"{path}.{m.group(1)}" if m and path else (m.group(1) if m else path))
            raise RecipeError(f"{label}: {exc}", where=at) from None
    return obj


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Load and validate a recipe YAML. ``overrides`` are dotted keys, e.g. {"rounds": 1}."""
    import yaml

    from megatron_sz.paths import resolve_resource

    p = resolve_resource(path, "recipes")
    if not p.is_file():
        raise RecipeError(f"recipe not found: {path}",
                          fix="pass a YAML file path, or a name from the recipes/ folder")
    from megatron_sz.data import read_text_lines

    text = "".join(read_text_lines(p, fix="save the recipe as UTF-8"))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise RecipeError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
    if data is None:
        # An empty file would otherwise load as all defaults and fail later on whatever
        # default needs something (it was reported as a tokenizer problem, issue 20).
        raise RecipeError("the recipe file is empty (or only comments)", where=str(p),
                          fix="start from recipes/local-tiny.yaml; see recipes/README.md")
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of keys to values, this file holds a {type(data).__name__}",
                          where=f"{p}:1", fix="start from recipes/local-tiny.yaml; see recipes/README.md")
    for dotted, value in (overrides or {}).items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    global _KEY_LINES, _KEY_LINES_FILE
    _KEY_LINES, _KEY_LINES_FILE = _yaml_key_lines(text), str(p)
    try:
        recipe = from_dict(Recipe, data, where=str(p))
    finally:
        _KEY_LINES, _KEY_LINES_FILE = {}, None
    recipe.source = str(p.resolve())
    _check_models_and_layouts(recipe)
    return recipe


def _check_models_and_layouts(recipe: Recipe) -> None:
    """Resolve model config paths, then refuse TP/PP layouts the model cannot be split into."""
    from megatron_sz.model_shape import check_model_layout

    for role in ("solver", "generator"):
        section = getattr(recipe, role)
        section.model.resolve_config(recipe, where=f"{role}.model")
        if section.model.config is None and section.model.hf_path is None:
            continue  # role left at its defaults
        try:
            cfg = section.model.hf_config(recipe, where=f"{role}.model")
        except RecipeError:
            continue  # hf_path not on this machine yet: checked when the job starts
        check_model_layout(cfg, tp=section.parallel.tp, pp=section.parallel.pp,
                           virtual_pp=section.parallel.virtual_pp,
                           sequence_parallel=section.parallel.sequence_parallel,
                           vocab_divisible_by=section.model.make_vocab_size_divisible_by,
                           where=f"{recipe.source}: {role}.parallel", config_where=f"{recipe.source}: {role}.model")


def recipe_to_dict(recipe: Any) -> dict:
    """Plain dict of a recipe (or any section), e.g. to record in a run directory."""
    return {f.name: (recipe_to_dict(getattr(recipe, f.name))
                     if dataclasses.is_dataclass(getattr(recipe, f.name)) else getattr(recipe, f.name))
            for f in dataclasses.fields(recipe) if not f.metadata.get("internal")}
