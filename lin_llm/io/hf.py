"""Hugging Face LLaMA directories <-> lin_llm checkpoints, tensor by tensor through safetensors.

Everything is validated (architecture, tensor names, shapes) before anything is written, and the
output appears only once complete. No torch needed: safetensors reads into numpy (bf16 via
ml_dtypes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lin_llm.config import ModelConfig, RopeConfig, model_config_from_dict
from lin_llm.errors import CheckpointError, ConfigError
from lin_llm.io.atomic import atomic_directory
from lin_llm.io.checkpoint import copy_tokenizer_files, load_model_dir, read_model_config, write_model_dir
from lin_llm.io.paths import require_model_directory
from lin_llm.io.streaming import LazyTensor
from lin_llm.model import flat_params, param_shapes

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float32"}  # fp16 widens losslessly
# Buffers some old exports carry; they are recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DEFAULT_SHARD_BYTES = 5 * 1024**3

# --------------------------------------------------------------------------- names


def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our flat param name -> (HF tensor name, transposed?). HF Linear weights are [out, in]."""
    names = {"embed.embedding": ("model.embed_tokens.weight", False), "norm.scale": ("model.norm.weight", False)}
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names[ours + "attn_norm.scale"] = (hf + "input_layernorm.weight", False)
        names[ours + "mlp_norm.scale"] = (hf + "post_attention_layernorm.weight", False)
        for our, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[f"{ours}attn.{our}.kernel"] = (f"{hf}self_attn.{theirs}.weight", True)
        for our, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            names[f"{ours}mlp.{our}.kernel"] = (f"{hf}mlp.{theirs}.weight", True)
    if not cfg.tie_embeddings:
        names["lm_head.kernel"] = ("lm_head.weight", True)
    return names


def hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, bool, tuple[int, ...]]]:
    """HF tensor name -> (our param name, transposed?, its shape in the HF layout) of cfg's model."""
    shapes = param_shapes(cfg)
    layout = {}
    for ours, (theirs, transposed) in hf_names(cfg).items():
        want = tuple(shapes[ours].shape)
        layout[theirs] = (ours, transposed, want[::-1] if transposed else want)
    return layout


def refuse_unexpected(source, unexpected) -> None:
    """A tensor that is not part of the model means another architecture: refuse, naming it."""
    unexpected = sorted(unexpected)
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all): not part of a LLaMA model"
        )


# --------------------------------------------------------------------------- configs


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers >= 5 nests rope_theta in rope_parameters; older configs use rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_len=int(params.get("original_max_position_embeddings", 8192)),
    )


def model_config_from_hf(hf: dict, param_dtype: str) -> ModelConfig:
    """Our ModelConfig from a HF LLaMA config.json (refusing what we cannot represent)."""
    archs = hf.get("architectures") or [f"<model_type {hf.get('model_type')!r}>"]
    if archs[0] not in SUPPORTED_ARCHITECTURES or hf.get("model_type", "llama") != "llama":
        raise CheckpointError(
            f"config.json: architecture {archs[0]} (model_type {hf.get('model_type')!r}) is not supported; "
            f"lin_llm converts dense LLaMA-family decoders: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hf.get(key):
            raise CheckpointError(f"config.json: {key}={hf[key]}: mixture-of-experts models are not supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"config.json: {key}=true is not supported (LLaMA has no projection biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (LLaMA uses silu)")
    n_heads = hf["num_attention_heads"]
    try:
        return model_config_from_dict(
            {
                "vocab_size": hf["vocab_size"],
                "dim": hf["hidden_size"],
                "n_layers": hf["num_hidden_layers"],
                "n_heads": n_heads,
                "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
                "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_heads,
                "ffn_dim": hf["intermediate_size"],
                "max_seq_len": hf.get("max_position_embeddings", 2048),
                "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
                "rope": vars(_rope_from_hf(hf)),
                "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
                "init_std": float(hf.get("initializer_range", 0.02)),
                "param_dtype": param_dtype,
                "compute_dtype": param_dtype,
                "bos_id": _single_id(hf.get("bos_token_id")),
                "eos_id": _single_id(hf.get("eos_token_id")),
            }
        )
    except KeyError as err:
        raise CheckpointError(f"config.json lacks the required field {err.args[0]!r}") from None
    except ConfigError as err:
        raise CheckpointError(f"config.json describes a model lin_llm cannot build: {err}") from None


def _single_id(value):
    return value[0] if isinstance(value, list) and value else value


def model_config_to_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.type}
    if cfg.rope.type in ("linear", "llama3"):
        rope["factor"] = cfg.rope.factor
    if cfg.rope.type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope.low_freq_factor,
            high_freq_factor=cfg.rope.high_freq_factor,
            original_max_position_embeddings=cfg.rope.original_max_len,
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope.theta,  # read by transformers < 5
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "dtype": cfg.param_dtype,
    }


# --------------------------------------------------------------------------- HF -> ours


@contextlib.contextmanager
def open_safetensors(path: Path):
    """safe_open(path), refusing a truncated or damaged file (what an interrupted download leaves)."""
    try:
        handle = safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a complete safetensors file ({err}); an interrupted download or copy leaves one: "
            "download or copy it again"
        ) from None
    with handle as f:
        yield f


def read_json(path: Path) -> dict:
    """The JSON object in ``path``, refusing a file that is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore or re-download it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, not a JSON object; restore or re-download it")
    return value


def read_weight_map(index: Path, hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file of a sharded checkpoint's index (safetensors' or PyTorch's)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map'")
    for shard in sorted(set(weight_map.values())):
        if not (hf_dir / shard).is_file():
            raise CheckpointError(f"{index} lists shard {shard}, which is missing from {hf_dir}")
    return {name: hf_dir / shard for name, shard in weight_map.items()}


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        return read_weight_map(index, hf_dir)
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    found = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise CheckpointError(
        f"no weights in {hf_dir}: expected model.safetensors or model.safetensors.index.json, or PyTorch's "
        "pytorch_model.bin or pytorch_model.bin.index.json (read with torch by python -m lin_llm.convert)"
        + (f"; found {', '.join(found)}" if found else "")
    )


def read_hf_config(hf_dir: Path) -> dict:
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    return read_json(config_file)


def model_config_for(hf_dir: Path, hf: dict, headers: dict[str, tuple]) -> ModelConfig:
    """The ModelConfig of config.json ``hf``, its dtype that of the embedding in ``headers``
    ({HF tensor name: (shape, safetensors dtype name, file name)})."""
    embed = headers.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"{hf_dir}: tensor model.embed_tokens.weight is missing")
    if embed[1] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{hf_dir}: dtype {embed[1]} is not supported (F32, BF16, F16)")
    return model_config_from_hf(hf, SAFETENSORS_DTYPES[embed[1]])


def check_llama_tensors(hf_dir: Path, cfg: ModelConfig, headers: dict[str, tuple]) -> dict[str, tuple[str, bool]]:
    """Our LLaMA param -> (its HF tensor, transposed?), once ``headers`` is checked to hold each
    tensor of cfg's LLaMA with its shape and a supported dtype."""
    found = {}
    for theirs, (ours, transposed, want) in hf_layout(cfg).items():
        if theirs not in headers:
            raise CheckpointError(f"{hf_dir}: tensor {theirs} is missing (needed for {ours})")
        shape, dtype, file = headers[theirs]
        if shape != want:
            raise CheckpointError(f"{hf_dir}/{file}: tensor {theirs} has shape {list(shape)}, config.json implies {list(want)}")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{hf_dir}/{file}: tensor {theirs} has dtype {dtype} (supported: F32, BF16, F16)")
        found[ours] = (theirs, transposed)
    return found


def non_llama_tensors(cfg: ModelConfig, names) -> list[str]:
    """The tensor names that are not part of cfg's LLaMA (nor a buffer recomputed from the config)."""
    used = {theirs for theirs, _ in hf_names(cfg).values()} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    return [name for name in names if name not in used and not name.endswith(IGNORED_SUFFIXES)]


def _plan(hf_dir: Path) -> tuple[ModelConfig, dict[str, tuple[str, bool, Path]]]:
    """Validate a HF directory completely (config, names, shapes) without reading tensor data."""
    hf = read_hf_config(hf_dir)
    files = weight_files(hf_dir)
    headers = {}
    for path in sorted(set(files.values())):
        with open_safetensors(path) as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                headers[name] = (tuple(tensor.get_shape()), tensor.get_dtype(), path.name)
    cfg = model_config_for(hf_dir, hf, headers)
    found = check_llama_tensors(hf_dir, cfg, headers)
    refuse_unexpected(hf_dir, non_llama_tensors(cfg, headers))
    return cfg, {ours: (theirs, transposed, files[theirs]) for ours, (theirs, transposed) in found.items()}


def hf_loaders(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, Callable[[], np.ndarray]]]:
    """Config and, per param of ours, a reader of its values (our layout, fp16 widened) from a HF
    directory validated completely first; each tensor is read only when its reader is called."""
    cfg, plan = _plan(Path(hf_dir))
    return cfg, {ours: _loader(path, theirs, transposed) for ours, (theirs, transposed, path) in plan.items()}


def _loader(path: Path, name: str, transposed: bool) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        with open_safetensors(path) as f:
            values = f.get_tensor(name)
        values = values.astype(np.float32) if values.dtype == np.float16 else values
        return np.ascontiguousarray(values.T) if transposed else values

    return load


def read_hf_checkpoint(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and our flat params from a HF directory, read one tensor at a time."""
    cfg, loaders = hf_loaders(hf_dir)
    return cfg, {name: load() for name, load in loaders.items()}


def lazy_params(cfg: ModelConfig, loaders: dict[str, Callable[[], np.ndarray]]) -> dict[str, LazyTensor]:
    """The params of cfg's model that ``loaders`` read, as LazyTensors in the config's param dtypes
    (written one at a time by write_model_dir)."""
    shapes = param_shapes(cfg)
    return {name: LazyTensor(tuple(shapes[name].shape), np.dtype(shapes[name].dtype),
                             lambda load=load, dtype=np.dtype(shapes[name].dtype): np.asarray(load(), dtype))
            for name, load in loaders.items()}


def convert_hf_to_checkpoint(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> ModelConfig:
    """Write the HF LLaMA directory ``hf_dir`` as a lin_llm checkpoint at ``out``, one tensor in memory at a time."""
    hf_dir = require_model_directory(hf_dir, "--hf-dir")
    cfg, loaders = hf_loaders(hf_dir)  # validates everything before `out` is touched
    with atomic_directory(out, overwrite, sources=(hf_dir,)) as tmp:
        write_model_dir(tmp, cfg, lazy_params(cfg, loaders), hf_dir)
    return cfg


# --------------------------------------------------------------------------- ours -> HF


# The authors' released layout (lin_llm/io/released.py): a LLaMA's tensors plus, in every layer, the
# original's dwconv (63 taps per head), alpha (global_factor) and, with model.la.learn_lambda, lambda
# (local_factor); Medusa heads each with its own output projection (medusa_lm_head.pt). It holds these
# presets as the original computes them with its fixed settings (GROUP_SIZE, the kernel, relu^2):
RELEASED_PRESETS = ("aug", "local_global")
RELEASED_LA = {"group_size": 64, "conv_kernel_size": 63, "conv_per_channel": False, "local_kernel": "relu2"}


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What --to-hf writes: layout "hf" (a plain Hugging Face LLaMA) or "released" (the authors'
    released layout); ``dropped`` says what a --softmax-only export leaves out ("" when nothing)."""

    layout: str
    dropped: str = ""


def _non_llama_parts(cfg: ModelConfig) -> list[str]:
    """What a model of cfg has beyond a plain LLaMA, in words."""
    parts = []
    if cfg.linear_layers:
        kept = f"; softmax in layers {list(cfg.softmax_layers)}" if cfg.softmax_layers else ""
        parts.append(f"linear attention (model.attention={cfg.attention!r}) in layers {list(cfg.linear_layers)}{kept}")
    if cfg.medusa_heads:
        projection = "each with its own output projection" if cfg.medusa_own_lm_head else "sharing the model's lm_head"
        parts.append(f"{cfg.medusa_heads} Medusa heads {projection}")
    return parts


def _unreleasable(cfg: ModelConfig) -> list[str]:
    """Why the released layout cannot hold the model of cfg (empty: it can)."""
    problems = []
    if cfg.linear_layers and cfg.softmax_layers:
        problems.append("a hybrid: the released layout, like the original code, linearises every layer")
    if cfg.linear_layers and cfg.attention not in RELEASED_PRESETS:
        problems.append(f"the released layout holds the presets {', '.join(RELEASED_PRESETS)} only")
    if cfg.linear_layers:
        problems += [f"model.la.{key}={getattr(cfg.la, key)!r}, where the original fixes {value!r}"
                     for key, value in RELEASED_LA.items() if getattr(cfg.la, key) != value]
    if cfg.medusa_heads and not cfg.medusa_own_lm_head:
        problems.append("shared-projection Medusa heads (model.medusa_own_lm_head=false): the released "
                        "medusa_lm_head.pt gives each head its own output projection")
    return problems


def check_exportable(cfg: ModelConfig, softmax_only: bool = False) -> ExportPlan:
    """The one decision of what --to-hf writes for a model of cfg, taken before anything is written.

    A softmax model without Medusa heads: a plain Hugging Face LLaMA. An aug or local_global model
    (every layer, the original's settings) and/or Medusa heads with their own projections: the
    authors' released layout. Anything else is refused, naming what would be lost, unless
    ``softmax_only``: then the LLaMA weights alone, and ``dropped`` names what is left out.
    """
    parts = _non_llama_parts(cfg)
    if softmax_only:
        return ExportPlan("hf", "; ".join(parts))
    problems = _unreleasable(cfg)
    if problems:
        raise CheckpointError(
            f"the checkpoint has {' and '.join(parts)}: {'; '.join(problems)}. A Hugging Face LLaMA has softmax "
            "attention in every layer and no Medusa heads, so these params would be lost and its outputs would "
            "change. Keep it as a lin_llm checkpoint (load_checkpoint and decode.py read it), or pass "
            "--softmax-only to export its LLaMA weights alone"
        )
    return ExportPlan("released" if parts else "hf")


def llama_tensors(cfg: ModelConfig, flat) -> dict[str, np.ndarray]:
    """The LLaMA tensors of our flat params by their HF names, in the HF layout."""
    tensors = {}
    for ours, (theirs, transposed) in hf_names(cfg).items():
        value = np.asarray(flat[ours])
        tensors[theirs] = np.ascontiguousarray(value.T) if transposed else value
    return tensors


def write_hf_files(directory: Path, config: dict, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """config.json and the tensors as safetensors (sharded with an index past max_shard_bytes)."""
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards


def export_to_hf(
    checkpoint: str | Path, out: str | Path, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    softmax_only: bool = False,
) -> ExportPlan:
    """Write a plain HF LLaMA directory (config.json, safetensors, tokenizer files) from our checkpoint
    (with ``softmax_only``, from the LLaMA weights of any checkpoint: see check_exportable)."""
    checkpoint = Path(checkpoint).absolute()
    cfg = read_model_config(checkpoint)
    plan = check_exportable(cfg, softmax_only)
    if plan.layout != "hf":
        raise CheckpointError(
            f"{checkpoint} exports to the authors' released layout (its params beyond a LLaMA's have a place "
            "there): use lin_llm.io.released.export_checkpoint, which python -m lin_llm.convert --to-hf calls"
        )
    flat = flat_params(load_model_dir(checkpoint, cfg))
    with atomic_directory(out, overwrite, sources=(checkpoint,)) as tmp:
        write_hf_files(tmp, model_config_to_hf(cfg), llama_tensors(cfg, flat), max_shard_bytes)
        copy_tokenizer_files(checkpoint, tmp)
    return plan
