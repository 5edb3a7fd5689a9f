"""Typed configuration: dataclasses loaded from YAML with ``key=value`` overrides.

Every field is checked when the config is loaded, so a typo or an impossible combination
fails before any work starts, with a message naming the field and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config field is unknown, mistyped, out of range or inconsistent with another."""


DTYPES = ("float32", "bfloat16")
ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding; ``type`` selects the frequency scaling (HF ``rope_type``)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_len: int = 8192  # llama3: the pre-training context length


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Options of the linear-attention presets (ignored by ``softmax``)."""

    group_size: int = 64  # G: tokens per group of the grouped local+global attention
    conv_kernel_size: int = 63  # full kernel; its future half is masked, K_eff = (size + 1) // 2
    conv_per_channel: bool = False  # the original shares one filter per head
    local_kernel: str = "relu2"  # "relu2" or "yoso"
    eps: float = 1e-6  # L2-normalisation epsilon of q and k
    feature_dim: int = 64  # random features of Performer FAVOR+; width f of lolcats' Hedgehog maps (F = 2f)
    seed: int = 0  # seed of fixed random features (and of lolcats' map init)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder. Field names follow the paper's notation, HF names in comments."""

    vocab_size: int = 260
    dim: int = 128  # hidden_size
    n_layers: int = 2  # num_hidden_layers
    n_heads: int = 4  # num_attention_heads
    n_kv_heads: int = 2  # num_key_value_heads
    head_dim: int = 0  # 0: dim // n_heads
    ffn_dim: int = 256  # intermediate_size
    max_seq_len: int = 1024  # max_position_embeddings
    norm_eps: float = 1e-5  # rms_norm_eps
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    tie_embeddings: bool = False
    init_std: float = 0.02  # initializer_range
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention: str = "softmax"
    attention_impl: str = "auto"
    la: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    bos_id: int | None = None
    eos_id: int | None = None
    medusa_heads: int = 0  # extra heads predicting tokens t+2 .. t+1+medusa_heads (Medusa decoding)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What train.py does (lin_llm.training). Batch sizes count sequences of ``seq_len`` tokens."""

    steps: int = 200
    batch_size: int = 8  # sequences per optimizer step, over all devices and hosts
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum each, summed in one step)
    # optimizer: AdamW, linear warm-up then the schedule, global-norm clipping
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant | linear (decay after warm-up)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine/linear decay to learning_rate * min_lr_ratio
    weight_decay: float = 0.0  # on matrices (kernels, embeddings, LoRA) only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    remat: bool = False  # recompute each block's activations in the backward pass
    objective: str = "lm"  # lm | medusa (the Medusa heads' loss; train.trainable=medusa) | lm+medusa
    seed: int = 0  # parameter init and data order
    # data
    data: str = "data/kjv.txt.xz"  # local text/JSONL/parquet file(s): comma-separated, globs ok
    dataset: str = ""  # a Hugging Face hub dataset name instead of train.data (needs network)
    dataset_config: str = ""
    dataset_split: str = "train"
    text_field: str = "text"
    tokenizer: str = "auto"  # auto (init_from's tokenizer.json, else bytes) | byte | DIR with tokenizer.json
    val_fraction: float = 0.05  # documents held out for validation (a fixed split, seed-independent)
    val_batches: int = 16  # validation batches (of batch_size sequences) per evaluation; 0 = the whole split
    # what to start from and what trains
    init_from: str = ""  # lin_llm or HF checkpoint dir; model.* of this config may change attention only
    trainable: str = ".*"  # regex (re.search) over param paths like layers.0.attn.wq.kernel
    lora_rank: int = 0  # > 0: LoRA on the params matching lora_targets (frozen base + A B)
    lora_alpha: float = 16.0
    lora_targets: str = r"attn\.(wq|wk|wv|wo)\.kernel$"
    # attention-transfer distillation before fine-tuning (LoLCATs): per-layer MSE to softmax
    distill_steps: int = 0
    distill_learning_rate: float = 1e-2
    distill_trainable: str = ""  # regex; empty = the linear-attention params a softmax model lacks
    # eval, checkpoints, logging
    eval_every: int = 100  # 0 = only at the end
    save_every: int = 100  # 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 3
    log_every: int = 10
    output_dir: str = "runs/default"
    export_model: bool = True  # write output_dir/model (a lin_llm checkpoint) at the end


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 takes the devices the other axes leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # multi-host: jax.distributed.initialize() is called when coordinator is set here, when the
    # JAX_COORDINATOR_ADDRESS environment variable is, or on a recognised cluster (TPU pod, SLURM)
    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


# --------------------------------------------------------------------------- building


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints widen to floats, nothing else)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field with an annotation this loader does not know
        raise TypeError(f"unsupported config annotation {tp} for {name}")
    raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _unknown_field(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown field '{prefix}{key}'; valid fields: {', '.join(names)}.{hint}")


def _build(cls, values: dict, prefix: str = ""):
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_field(cls, key, f"{prefix}.".lstrip("."))
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}".lstrip("."))
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        tree = node
    tree[leaf] = value


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.field=value (e.g. model.n_layers=4)")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict, overrides: typing.Sequence[str] = ()) -> Config:
    tree = copy.deepcopy(dict(values or {}))
    for item in overrides:
        key, value = _parse_override(item)
        _set_path(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML; None for the defaults) and apply ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (the shipped ones are in configs/)")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, train, mesh), got {type(values).__name__}")
    return config_from_dict(values, overrides)


def model_config_from_dict(values: dict) -> ModelConfig:
    cfg = _build(ModelConfig, values, "model")
    validate_model(cfg)
    return cfg


def save_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(value: str, allowed: typing.Sequence[str], name: str) -> None:
    _require(value in allowed, f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}")


def _positive(value, name: str) -> None:
    _require(value > 0, f"{name}={value} must be > 0")


def validate_model(m: ModelConfig) -> None:
    from lin_llm.attention import presets  # the registry of mixers lives with the math

    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        _positive(getattr(m, name), f"model.{name}")
    _positive(m.norm_eps, "model.norm_eps")
    _positive(m.init_std, "model.init_std")
    _require(m.head_dim >= 0, f"model.head_dim={m.head_dim} must be >= 0 (0 means dim // n_heads)")
    if m.head_dim == 0:
        _require(
            m.dim % m.n_heads == 0,
            f"model.n_heads={m.n_heads} must divide model.dim={m.dim} (or set model.head_dim explicitly)",
        )
    _require(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} (grouped-query attention)",
    )
    _require(m.resolved_head_dim % 2 == 0, f"model.head_dim={m.resolved_head_dim} must be even for RoPE")
    _choice(m.param_dtype, DTYPES, "model.param_dtype")
    _choice(m.compute_dtype, DTYPES, "model.compute_dtype")
    _choice(m.attention_impl, ATTENTION_IMPLS, "model.attention_impl")
    presets.validate_name(m.attention)
    _choice(m.rope.type, ROPE_TYPES, "model.rope.type")
    _positive(m.rope.theta, "model.rope.theta")
    _positive(m.rope.factor, "model.rope.factor")
    if m.rope.type == "llama3":
        _require(
            m.rope.high_freq_factor > m.rope.low_freq_factor,
            f"model.rope.high_freq_factor={m.rope.high_freq_factor} must exceed "
            f"model.rope.low_freq_factor={m.rope.low_freq_factor}",
        )
        _positive(m.rope.original_max_len, "model.rope.original_max_len")
    la = m.la
    _positive(la.group_size, "model.la.group_size")
    _require(
        la.conv_kernel_size >= 1 and la.conv_kernel_size % 2 == 1,
        f"model.la.conv_kernel_size={la.conv_kernel_size} must be a positive odd number "
        "(the future half of a centred kernel is masked)",
    )
    _choice(la.local_kernel, ("relu2", "yoso"), "model.la.local_kernel")
    _positive(la.eps, "model.la.eps")
    _positive(la.feature_dim, "model.la.feature_dim")
    _require(m.medusa_heads >= 0, f"model.medusa_heads={m.medusa_heads} must be >= 0")
    for name in ("bos_id", "eos_id"):
        tok = getattr(m, name)
        _require(tok is None or 0 <= tok < m.vocab_size, f"model.{name}={tok} must be in [0, vocab_size={m.vocab_size})")


LR_SCHEDULES = ("cosine", "constant", "linear")


def _regex(value: str, name: str) -> None:
    import re

    try:
        re.compile(value)
    except re.error as err:
        raise ConfigError(f"{name}={value!r} is not a valid regular expression: {err}") from None


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    t = cfg.train
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep_checkpoints", "log_every"):
        _positive(getattr(t, name), f"train.{name}")
    _positive(t.learning_rate, "train.learning_rate")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _choice(t.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _choice(t.objective, ("lm", "medusa", "lm+medusa"), "train.objective")
    _require(
        "medusa" not in t.objective or cfg.model.medusa_heads > 0,
        f"train.objective={t.objective!r} trains Medusa heads; set model.medusa_heads > 0 (e.g. 4)",
    )
    for name in ("beta1", "beta2"):
        _require(0.0 <= getattr(t, name) < 1.0, f"train.{name}={getattr(t, name)} must be in [0, 1)")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 turns clipping off)")
    _require(
        t.batch_size % t.grad_accum == 0,
        f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size} "
        "(each step sums grad_accum micro-batches of equal size)",
    )
    _require(0.0 < t.val_fraction < 1.0, f"train.val_fraction={t.val_fraction} must be in (0, 1)")
    for name in ("val_batches", "eval_every", "save_every", "lora_rank", "distill_steps"):
        _require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0")
    _positive(t.lora_alpha, "train.lora_alpha")
    _positive(t.distill_learning_rate, "train.distill_learning_rate")
    for name in ("trainable", "lora_targets", "distill_trainable"):
        _regex(getattr(t, name), f"train.{name}")
    _require(bool(t.data or t.dataset), "train.data is empty: give a local text/JSONL/parquet file or set train.dataset")
    _require(t.text_field != "", "train.text_field must name the column that holds the text")
    _require(
        t.distill_steps == 0 or cfg.model.attention != "softmax",
        "train.distill_steps > 0 distils softmax attention into linear attention; "
        "set model.attention to a linear preset (e.g. aug) or train.distill_steps=0",
    )
    _require(
        t.distill_steps == 0 or t.init_from != "",
        "train.distill_steps > 0 needs train.init_from: a trained softmax checkpoint to distil from",
    )
    _require(t.output_dir != "", "train.output_dir must be set (checkpoints and metrics go there)")
    _require(
        t.seq_len <= cfg.model.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
        "lower train.seq_len or raise model.max_seq_len",
    )
    axes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "mesh.tensor": cfg.mesh.tensor}
    for name, size in axes.items():
        _require(size == -1 or size >= 1, f"{name}={size} must be >= 1, or -1 to take the remaining devices")
    _require(
        sum(size == -1 for size in axes.values()) <= 1,
        "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1",
    )
    _require(cfg.mesh.num_processes >= 0, f"mesh.num_processes={cfg.mesh.num_processes} must be >= 0 (0 = from the environment)")
    _require(cfg.mesh.process_id >= -1, f"mesh.process_id={cfg.mesh.process_id} must be >= 0, or -1 for the environment's")
