"""Typed configuration: dataclasses loaded from YAML with ``key=value`` overrides.

Every field is checked when the config is loaded, so a typo or an impossible combination
fails before any work starts, with a message naming the field and what is allowed. What a
field allows, and what else depends on it, is declared on the field itself (``spec``): the
loader checks ranges and choices from that metadata, and training reads which fields a resumed
run must keep, which ones the compiled step depends on and which a linearised checkpoint may
change.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lin_llm.attention import presets
from lin_llm.errors import ConfigError
from pallas_kernels import IMPL_FLAGS

DTYPES = ("float32", "bfloat16")


def spec(default, *, check: str | None = None, choices: tuple | None = None, resume=False, step=False,
         linearize=False):
    """A dataclass field with its rules as metadata.

    check: "positive" (> 0), "non_negative" (>= 0), "fraction" ([0, 1]), "unit" ([0, 1)) or "regex";
    choices: the allowed values; resume: a resumed run must keep it (it changes the state or the
    data order); step: the compiled train step depends on it; linearize: a checkpoint loaded with
    train.init_from may differ in it (nothing with weights).
    """
    metadata = {"check": check, "choices": choices, "resume": resume, "step": step, "linearize": linearize}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_names(cls, flag: str) -> tuple[str, ...]:
    """The fields of ``cls`` whose metadata sets ``flag`` (resume, step or linearize)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(flag))


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding; ``type`` selects the frequency scaling (HF ``rope_type``)."""

    theta: float = spec(10000.0, check="positive")
    type: str = spec("default", choices=("default", "linear", "llama3"))
    factor: float = spec(1.0, check="positive")  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_len: int = spec(8192, check="positive")  # llama3: the pre-training context length


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Options of the linear-attention presets (ignored by ``softmax``)."""

    group_size: int = spec(64, check="positive")  # G: tokens per group of the grouped local+global attention
    conv_kernel_size: int = 63  # full kernel; its future half is masked, K_eff = (size + 1) // 2
    conv_per_channel: bool = False  # the original shares one filter per head
    local_kernel: str = spec("relu2", choices=("relu2", "yoso"))
    eps: float = spec(1e-6, check="positive")  # L2-normalisation epsilon of q and k
    feature_dim: int = spec(64, check="positive")  # random features of Performer; width f of lolcats' maps (F = 2f)
    seed: int = 0  # seed of fixed random features (Performer) and of FLASH's and lolcats' random initial params
    # lambda, the weight of the local term: a parameter (init 1, the original's LOCAL_FACTOR=1) or, by
    # default, the constant 1 of the published runs (tasks_run-llama2.sh sets no LOCAL_FACTOR)
    learn_lambda: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder. Field names follow the paper's notation, HF names in comments."""

    vocab_size: int = spec(260, check="positive")
    dim: int = spec(128, check="positive")  # hidden_size
    n_layers: int = spec(2, check="positive")  # num_hidden_layers
    n_heads: int = spec(4, check="positive")  # num_attention_heads
    n_kv_heads: int = spec(2, check="positive")  # num_key_value_heads
    head_dim: int = spec(0, check="non_negative")  # 0: dim // n_heads
    ffn_dim: int = spec(256, check="positive")  # intermediate_size
    max_seq_len: int = spec(1024, check="positive")  # max_position_embeddings
    norm_eps: float = spec(1e-5, check="positive")  # rms_norm_eps
    rope: RopeConfig = spec(RopeConfig())
    tie_embeddings: bool = False
    init_std: float = spec(0.02, check="positive")  # initializer_range
    param_dtype: str = spec("float32", choices=DTYPES)
    compute_dtype: str = spec("float32", choices=DTYPES, linearize=True)
    attention: str = spec("softmax", linearize=True)  # a name of lin_llm.attention.presets.NAMES
    # hybrid models: these layers keep softmax attention, the others use `attention` (e.g. [0, 15])
    softmax_layers: tuple[int, ...] = spec((), linearize=True)
    attention_impl: str = spec("auto", choices=IMPL_FLAGS, linearize=True)
    la: AttentionConfig = spec(AttentionConfig(), linearize=True)
    bos_id: int | None = None
    eos_id: int | None = None
    # extra heads predicting tokens t+2 .. t+1+medusa_heads (Medusa decoding)
    medusa_heads: int = spec(0, check="non_negative", linearize=True)
    # each Medusa head with its own output projection [dim, V] (the original Medusa's, as in the authors'
    # released medusa_lm_head.pt) instead of the model's shared lm_head
    medusa_own_lm_head: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def layer_attention(self, layer: int) -> str:
        """The attention preset of layer ``layer``: softmax where softmax_layers keeps it."""
        return "softmax" if layer in self.softmax_layers else self.attention

    @property
    def attention_summary(self) -> str:
        """The attention in words for logs: "aug", or "aug, softmax in layers [0, 15]" for a hybrid."""
        return self.attention + (f", softmax in layers {list(self.softmax_layers)}" if self.softmax_layers else "")

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """The indices of the layers with linear attention (none for a softmax model)."""
        return tuple(i for i in range(self.n_layers) if self.layer_attention(i) != "softmax")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What train.py does (lin_llm.training). Batch sizes count sequences of ``seq_len`` tokens."""

    steps: int = spec(200, check="non_negative", step=True)  # 0: attention transfer only (distill_steps > 0)
    batch_size: int = spec(8, check="positive", resume=True, step=True)  # sequences per step, all devices and hosts
    seq_len: int = spec(128, check="positive", resume=True, step=True)
    # micro-batches per step (batch_size / grad_accum each, summed in one step)
    grad_accum: int = spec(1, check="positive", resume=True, step=True)
    # optimizer: AdamW, linear warm-up then the schedule, global-norm clipping
    learning_rate: float = spec(1e-3, check="positive", step=True)
    lr_schedule: str = spec("cosine", choices=("cosine", "constant", "linear"), step=True)  # decay after warm-up
    warmup_steps: int = spec(20, check="non_negative", step=True)
    min_lr_ratio: float = spec(0.1, check="fraction", step=True)  # cosine/linear decay to learning_rate * this
    weight_decay: float = spec(0.0, check="non_negative", step=True)  # on matrices (kernels, embeddings, LoRA) only
    beta1: float = spec(0.9, check="unit", step=True)
    beta2: float = spec(0.95, check="unit", step=True)
    grad_clip: float = spec(1.0, check="non_negative", step=True)  # max global gradient norm; 0 = no clipping
    remat: bool = spec(False, step=True)  # recompute each block's activations in the backward pass
    # lm | medusa (the Medusa heads' loss; train.trainable=medusa) | lm+medusa
    objective: str = spec("lm", choices=("lm", "medusa", "lm+medusa"), step=True)
    seed: int = spec(0, resume=True)  # parameter init and data order
    # data
    data: str = spec("data/kjv.txt.xz", resume=True)  # local text/JSONL/parquet file(s): comma-separated, globs
    dataset: str = spec("", resume=True)  # a Hugging Face hub dataset name instead of train.data (needs network)
    dataset_config: str = spec("", resume=True)
    dataset_split: str = spec("train", resume=True)
    text_field: str = spec("text", resume=True)
    # auto (init_from's tokenizer.json, else bytes) | byte | DIR with tokenizer.json
    tokenizer: str = spec("auto", resume=True)
    # documents held out for validation (a fixed split, seed-independent)
    val_fraction: float = spec(0.05, resume=True)
    val_batches: int = spec(16, check="non_negative")  # validation batches (of batch_size sequences); 0 = all
    # what to start from and what trains
    init_from: str = ""  # lin_llm or HF checkpoint dir; model.* of this config may change attention only
    trainable: str = spec(".*", check="regex", resume=True, step=True)  # re.search over paths like layers.0.attn.wq.kernel
    lora_rank: int = spec(0, check="non_negative", resume=True, step=True)  # > 0: LoRA on lora_targets (frozen base + A B)
    lora_alpha: float = spec(16.0, check="positive", resume=True, step=True)
    lora_targets: str = spec(r"attn\.(wq|wk|wv|wo)\.kernel$", check="regex", resume=True, step=True)
    # attention-transfer distillation before fine-tuning (LoLCATs): per-layer MSE to softmax
    distill_steps: int = spec(0, check="non_negative")
    distill_learning_rate: float = spec(1e-2, check="positive")
    distill_trainable: str = spec("", check="regex")  # empty = the linear-attention params a softmax model lacks
    # eval, checkpoints, logging
    eval_every: int = spec(100, check="non_negative")  # 0 = only at the end
    save_every: int = spec(100, check="non_negative")  # 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = spec(3, check="positive")
    log_every: int = spec(10, check="positive")
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
    num_processes: int = spec(0, check="non_negative")  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = spec(ModelConfig())
    train: TrainConfig = spec(TrainConfig())
    mesh: MeshConfig = spec(MeshConfig())


# --------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints widen to floats, nothing else)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if origin is tuple:  # tuple[X, ...]: a YAML list (or an override such as [0,15])
        (item, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of {item.__name__} (e.g. [0, 15]), got {value!r}")
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, name)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[tp]
    if isinstance(value, accepted) and (tp is bool or not isinstance(value, bool)):
        return float(value) if tp is float else value
    raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _unknown_field(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown field '{prefix}{key}'; valid fields: {', '.join(names)}.{hint}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
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
    if not raw.strip():
        return key.strip(), ""
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:  # not a YAML value (e.g. the regex "[lm]_head"): the text itself
        return key.strip(), raw


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _overridden_tree(values: dict, overrides: typing.Sequence[str]) -> dict:
    tree = copy.deepcopy(dict(values or {}))
    for item in overrides:
        key, value = _parse_override(item)
        _set_path(tree, key, value)
    return tree


def config_from_dict(values: dict, overrides: typing.Sequence[str] = ()) -> Config:
    cfg = _build(Config, _overridden_tree(values, overrides))
    validate(cfg)
    return cfg


def _read_yaml(path: Path, chain: tuple = ()) -> dict:
    """The YAML mapping at ``path``, on top of the file its ``base:`` key names (relative to it)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (the shipped ones are in configs/)")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `base:` files include each other ({' -> '.join(str(p) for p in chain)})")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML{_yaml_problem(err)}; fix the syntax there") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, train, mesh), got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be the path of another config file, got {base!r}")
    return _merge(_read_yaml(path.parent / base, chain + (path.resolve(),)), values)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what a YAML syntax error is, on one line."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark, context, context_mark = (getattr(err, name, None) for name in ("problem_mark", "context", "context_mark"))
    problem = getattr(err, "problem", None) or str(err)
    if context:
        problem = f"{context}" + (f" (from {at(context_mark)})" if context_mark else "") + f": {problem}"
    return (f" at {at(mark)}" if mark else "") + ": " + " ".join(problem.split())


def _merge(base: dict, values: dict) -> dict:
    """``values`` over ``base``, section by section (nested mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in values.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML; None for the defaults) and apply ``key=value`` overrides. A file may
    start from another with ``base: other.yaml`` and change only some of its fields."""
    return config_from_dict(_read_yaml(Path(path)) if path is not None else {}, overrides)


def model_config_from_dict(values: dict) -> ModelConfig:
    cfg = _build(ModelConfig, values, "model")
    validate_model(cfg)
    return cfg


def override_model_config(cfg: ModelConfig, overrides: typing.Sequence[str]) -> ModelConfig:
    """``cfg`` with model-config overrides (``attention=aug`` or ``model.attention=aug``)."""
    prefixed = [item if item.startswith("model.") else f"model.{item}" for item in overrides]
    # the model alone is validated: the train section's defaults (e.g. seq_len) do not apply here
    return model_config_from_dict(_overridden_tree({"model": config_to_dict(cfg)}, prefixed)["model"])


# --------------------------------------------------------------------------- validation

_CHECKS = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "fraction": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "unit": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_fields(section, prefix: str) -> None:
    """The rules declared on each field (spec), recursing into nested sections."""
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            _check_fields(value, name)
            continue
        check, choices = f.metadata.get("check"), f.metadata.get("choices")
        if choices is not None:
            _require(value in choices, f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")
        if check == "regex":
            try:
                re.compile(value)
            except re.error as err:
                raise ConfigError(f"{name}={value!r} is not a valid regular expression: {err}") from None
        elif check is not None:
            ok, rule = _CHECKS[check]
            _require(ok(value), f"{name}={value} {rule}")


def validate_model(m: ModelConfig) -> None:
    _check_fields(m, "model")
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
    _require(
        m.attention in presets.NAMES,
        f"model.attention={m.attention!r} is not a known preset; choose one of: {', '.join(presets.NAMES)}",
    )
    _validate_softmax_layers(m)
    if m.rope.type == "llama3":
        _require(
            m.rope.high_freq_factor > m.rope.low_freq_factor,
            f"model.rope.high_freq_factor={m.rope.high_freq_factor} must exceed "
            f"model.rope.low_freq_factor={m.rope.low_freq_factor}",
        )
    _require(
        m.la.conv_kernel_size >= 1 and m.la.conv_kernel_size % 2 == 1,
        f"model.la.conv_kernel_size={m.la.conv_kernel_size} must be a positive odd number "
        "(the future half of a centred kernel is masked)",
    )
    _require(
        m.medusa_heads > 0 or not m.medusa_own_lm_head,
        "model.medusa_own_lm_head=true gives each Medusa head its own output projection, but model.medusa_heads=0; "
        "set model.medusa_heads > 0 or model.medusa_own_lm_head=false",
    )
    for name in ("bos_id", "eos_id"):
        tok = getattr(m, name)
        _require(tok is None or 0 <= tok < m.vocab_size, f"model.{name}={tok} must be in [0, vocab_size={m.vocab_size})")


def _validate_softmax_layers(m: ModelConfig) -> None:
    layers = m.softmax_layers
    if not layers:
        return
    name = f"model.softmax_layers={list(layers)}"
    for i in layers:
        _require(0 <= i < m.n_layers,
                 f"{name}: layer {i} is out of range; the layers are numbered 0..{m.n_layers - 1} (model.n_layers)")
        _require(layers.count(i) == 1, f"{name}: layer {i} is listed twice")
    _require(
        m.attention != "softmax",
        f"{name} has no effect with model.attention='softmax': set model.attention to the linear preset of the "
        "other layers (e.g. aug), or model.softmax_layers=[]",
    )
    _require(
        len(layers) < m.n_layers,
        f"{name} lists every layer: that is a softmax model; set model.attention=softmax and model.softmax_layers=[]",
    )


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    _check_fields(t, "train")
    _require(
        "medusa" not in t.objective or cfg.model.medusa_heads > 0,
        f"train.objective={t.objective!r} trains Medusa heads; set model.medusa_heads > 0 (e.g. 4)",
    )
    _require(t.steps > 0 or t.distill_steps > 0, "train.steps=0 trains nothing; set train.steps > 0 or train.distill_steps > 0")
    _require(
        t.batch_size % t.grad_accum == 0,
        f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size} "
        "(each step sums grad_accum micro-batches of equal size)",
    )
    _require(0.0 < t.val_fraction < 1.0, f"train.val_fraction={t.val_fraction} must be in (0, 1)")
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


def _validate_mesh(mesh: MeshConfig) -> None:
    _check_fields(mesh, "mesh")
    axes = {"mesh.data": mesh.data, "mesh.fsdp": mesh.fsdp, "mesh.tensor": mesh.tensor}
    for name, size in axes.items():
        _require(size == -1 or size >= 1, f"{name}={size} must be >= 1, or -1 to take the remaining devices")
    _require(sum(size == -1 for size in axes.values()) <= 1, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    _require(mesh.process_id >= -1, f"mesh.process_id={mesh.process_id} must be >= 0, or -1 for the environment's")


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    _validate_train(cfg)
    _validate_mesh(cfg.mesh)
