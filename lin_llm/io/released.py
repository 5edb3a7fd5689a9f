"""The authors' released linearized LLaMA-2 (Hugging Face org LinearizedLLM: llama-2-7b-aug-linear)
and its Medusa heads (llama-2-7b-medusa-head-aug-linear) <-> lin_llm checkpoints.

The layout, as GATECH-EIC/Linearized-LLM builds and saves it (experiments/fine-tune.py,
gen_model_answer_medusa.py, medusa/model/medusa_model.py): a Hugging Face LLaMA directory
(config.json; PyTorch pytorch_model-*.bin shards with pytorch_model.bin.index.json, or
pytorch_model.bin, or safetensors) whose every layer i also holds
  model.layers.{i}.self_attn.dwconv.weight [H, 1, 63, 1]: Conv2d(H, H, (63, 1), padding (31, 0),
      groups=H, no bias) over v [B, H, T, D] after repeat_kv, so out_t = sum_k w[k] v_{t+k-31}:
      tap k is lag 31 - k, exactly our centred conv[h, k] (query head h). Taps k > 31 see the
      future; the original zeroes them in place before each use (weight *= conv_mask) and training
      moves them again after, so stored ones may be non-zero: they are zeroed on load.
  model.layers.{i}.self_attn.conv_mask [1, 1, 63, 1]: that mask (a buffer), checked and dropped
  model.layers.{i}.self_attn.global_factor [1]: alpha (GLOBAL_FACTOR)      -> layers.{i}.attn.mix_global
  model.layers.{i}.self_attn.local_factor [1]: lambda (LOCAL_FACTOR)       -> mix_local (model.la.learn_lambda)
dwconv + global_factor is aug, global_factor alone local_global, each with the original's fixed
settings (lin_llm.io.hf.RELEASED_LA). The vocabulary may extend the tokenizer's (32001 tokens: the
added [PAD] of fine-tune.py; added_tokens.json is copied along).
medusa_lm_head.pt: MedusaModel's medusa_head state dict (medusa_num_layers=1), per head i
  {i}.0.linear.weight [D, D], {i}.0.linear.bias [D]: ResBlock x + SiLU(W x + b) -> medusa.{i}.kernel (W^T), .bias
  {i}.1.weight [V, D]: the head's own output projection                      -> medusa.{i}.lm_head.kernel
PyTorch files are read with torch (an optional dependency), weights_only=True, memory-mapped.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import re
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from lin_llm.config import ModelConfig
from lin_llm.errors import CheckpointError
from lin_llm.io import hf
from lin_llm.io.atomic import atomic_directory
from lin_llm.io.checkpoint import copy_tokenizer_files, load_model_dir, read_model_config, write_model_dir
from lin_llm.io.paths import require_model_directory
from lin_llm.model import flat_params, param_shapes

KERNEL = hf.RELEASED_LA["conv_kernel_size"]
CENTRE = KERNEL // 2  # the tap of the current token
# the original's per-layer tensor (model.layers.{i}.self_attn.NAME) -> our param (layers.{i}.attn.NAME)
LAYER_TENSORS = {"dwconv.weight": "conv", "global_factor": "mix_global", "local_factor": "mix_local"}
CONV_MASK = "conv_mask"
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.(dwconv\.weight|global_factor|local_factor|conv_mask)")
_MEDUSA_NAME = re.compile(r"(\d+)\.(0\.linear\.weight|0\.linear\.bias|1\.weight)")
MEDUSA_FILE = "medusa_lm_head.pt"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def conv_mask() -> np.ndarray:
    """fine-tune.py's conv_mask [1, 1, 63, 1]: one at the taps of the current and past tokens."""
    mask = np.ones((1, 1, KERNEL, 1), np.float32)
    mask[:, :, CENTRE + 1 :, :] = 0.0
    return mask


# --------------------------------------------------------------------------- reading tensors


@dataclasses.dataclass(frozen=True)
class Source:
    """One stored tensor: its shape, dtype (safetensors' names: F32, BF16, F16, ...), file and a
    reader of its values (float32, or bfloat16 for BF16)."""

    shape: tuple[int, ...]
    dtype: str
    file: str
    load: Callable[[], np.ndarray]


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "PyTorch weights (.bin, .pt) are read and written with torch, an optional dependency of lin_llm: "
            "pip install torch (the CPU build is enough)"
        ) from None
    return torch


def _torch_dtype_name(tensor) -> str:
    torch = _torch()
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(tensor.dtype, str(tensor.dtype))


def _torch_values(tensor) -> np.ndarray:
    torch = _torch()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.to(torch.float32).numpy().copy()  # fp16 widens losslessly


def _safetensors_values(path: Path, name: str) -> np.ndarray:
    with hf.open_safetensors(path) as f:
        values = f.get_tensor(name)
    return values.astype(np.float32) if values.dtype == np.float16 else values


def _torch_load(torch, path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap can only be used" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # torch.save's pre-1.6 format: read whole


def file_sources(path: Path) -> dict[str, Source]:
    """The tensors of one weights file: safetensors by its suffix, else PyTorch (torch.load with
    weights_only=True and mmap, so values are read only when loaded)."""
    if path.suffix == ".safetensors":
        with hf.open_safetensors(path) as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: Source(tuple(s.get_shape()), s.get_dtype(), path.name,
                                 functools.partial(_safetensors_values, path, name)) for name, s in slices.items()}
    torch = _torch()
    try:
        state = _torch_load(torch, path)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"{path} cannot be read as PyTorch weights ({type(err).__name__}: {detail}); an interrupted download "
            "leaves a truncated file: download it again"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (name -> tensor)")
    return {name: Source(tuple(t.shape), _torch_dtype_name(t), path.name, functools.partial(_torch_values, t))
            for name, t in state.items()}


def _bin_files(hf_dir: Path) -> list[Path] | None:
    """The PyTorch weight files of hf_dir (the index's shards, which must each hold what it lists), or None."""
    if (hf_dir / BIN_INDEX).is_file():
        return sorted(set(hf.read_weight_map(hf_dir / BIN_INDEX, hf_dir).values()))
    return [hf_dir / BIN_SINGLE] if (hf_dir / BIN_SINGLE).is_file() else None


def _sources(hf_dir: Path, files: list[Path]) -> dict[str, Source]:
    sources = {}
    for path in files:
        sources.update(file_sources(path))
    if (hf_dir / BIN_INDEX).is_file():
        for name, shard in hf.read_weight_map(hf_dir / BIN_INDEX, hf_dir).items():
            if name not in sources or sources[name].file != shard.name:
                raise CheckpointError(f"{hf_dir / BIN_INDEX} puts tensor {name} in {shard.name}, which does not hold it")
    return sources


def _is_released(hf_dir: Path) -> bool:
    """Whether hf_dir needs this module: PyTorch weights, or safetensors with the released layout's tensors."""
    return _bin_files(hf_dir) is not None or any(_LAYER_NAME.fullmatch(name) for name in hf.weight_files(hf_dir))


# --------------------------------------------------------------------------- released -> ours


def _layer_tensors(hf_dir: Path, cfg: ModelConfig, names: list[str]) -> dict[int, dict[str, str]]:
    """{layer: {"dwconv.weight" | ...: tensor name}} of the released layout's extra tensors, refusing
    any other tensor that is not a LLaMA's, and layers that differ in what they hold."""
    by_layer: dict[int, dict[str, str]] = {}
    for name in names:
        match = _LAYER_NAME.fullmatch(name)
        if not match or int(match[1]) >= cfg.n_layers:
            raise CheckpointError(
                f"{hf_dir}: unexpected tensor {name} ({len(names)} beyond the LLaMA's): neither part of a LLaMA "
                "model nor of the authors' released layout (model.layers.N.self_attn.dwconv.weight, global_factor, "
                f"local_factor, conv_mask for N < {cfg.n_layers})"
            )
        by_layer.setdefault(int(match[1]), {})[match[2]] = name
    kinds = {i: sorted(held) for i, held in by_layer.items()}
    if by_layer and (len(by_layer) != cfg.n_layers or len({tuple(k) for k in kinds.values()}) != 1):
        described = "; ".join(f"layer {i}: {', '.join(kinds.get(i, ['nothing']))}" for i in range(cfg.n_layers))
        raise CheckpointError(
            f"{hf_dir}: the layers hold different extra tensors ({described}): the original code linearises "
            "every layer alike, so this is no checkpoint of its layout"
        )
    return by_layer


def _released_config(hf_dir: Path, cfg: ModelConfig, held: set[str]) -> ModelConfig:
    """cfg with the attention that the released layout's extra tensors (``held``, one layer's) imply."""
    if "global_factor" not in held:
        raise CheckpointError(
            f"{hf_dir}: the layers hold {', '.join(sorted(held))} but no global_factor: the original ran such a model "
            "with USE_GLOBAL (alpha fixed at 1) or without (local + conv), and its files do not say which; "
            "lin_llm reads the released presets aug (dwconv + global_factor) and local_global (global_factor)"
        )
    if CONV_MASK in held and "dwconv.weight" not in held:
        raise CheckpointError(f"{hf_dir}: the layers hold a conv_mask but no dwconv.weight")
    la = dataclasses.replace(cfg.la, **hf.RELEASED_LA, learn_lambda="local_factor" in held)
    return dataclasses.replace(cfg, attention="aug" if "dwconv.weight" in held else "local_global", la=la)


def _check_layer_tensor(hf_dir: Path, cfg: ModelConfig, source: Source, name: str, kind: str) -> None:
    want = {"dwconv.weight": (cfg.n_heads, 1, KERNEL, 1), CONV_MASK: (1, 1, KERNEL, 1)}.get(kind, (1,))
    if source.shape != want:
        conv = f" (Conv2d({cfg.n_heads}, {cfg.n_heads}, ({KERNEL}, 1), groups={cfg.n_heads}): one filter per query head)"
        raise CheckpointError(
            f"{hf_dir}/{source.file}: tensor {name} has shape {list(source.shape)}; the released layout's is "
            f"{list(want)}{conv if kind == 'dwconv.weight' else ''}"
        )
    if source.dtype not in hf.SAFETENSORS_DTYPES:
        raise CheckpointError(f"{hf_dir}/{source.file}: tensor {name} has dtype {source.dtype} (supported: F32, BF16, F16)")
    if kind == CONV_MASK and not np.array_equal(np.asarray(source.load(), np.float32), conv_mask()):
        raise CheckpointError(
            f"{hf_dir}/{source.file}: tensor {name} is not the original's causal conv mask (ones at taps 0..{CENTRE}, "
            "zeros after): the conv of this checkpoint would see other taps than the original code's"
        )


def _layer_loader(source: Source, kind: str, n_heads: int) -> Callable[[], np.ndarray]:
    def load():
        values = source.load()
        if kind != "dwconv.weight":
            return values.reshape(())
        taps = values.reshape(n_heads, KERNEL).copy()
        taps[:, CENTRE + 1 :] = 0  # the future taps, which the original masks before every use
        return taps

    return load


def _llama_loader(source: Source, transposed: bool) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(source.load().T) if transposed else source.load()


def plan_model_dir(hf_dir: Path) -> tuple[ModelConfig, dict[str, Callable]]:
    """Validate a released-layout (or PyTorch) directory completely, reading only its shapes and
    the conv masks: the config and {our param: a reader of its values}."""
    hf_config = hf.read_hf_config(hf_dir)
    sources = _sources(hf_dir, _bin_files(hf_dir) or sorted(set(hf.weight_files(hf_dir).values())))
    headers = {name: (s.shape, s.dtype, s.file) for name, s in sources.items()}
    cfg = hf.model_config_for(hf_dir, hf_config, headers)
    by_layer = _layer_tensors(hf_dir, cfg, hf.non_llama_tensors(cfg, headers))
    if by_layer:
        cfg = _released_config(hf_dir, cfg, set(by_layer[0]))
    loaders = {ours: _llama_loader(sources[theirs], transposed)
               for ours, (theirs, transposed) in hf.check_llama_tensors(hf_dir, cfg, headers).items()}
    for i, held in by_layer.items():
        for kind, name in held.items():
            _check_layer_tensor(hf_dir, cfg, sources[name], name, kind)
            if kind != CONV_MASK:  # checked, and recomputed from the config
                loaders[f"layers.{i}.attn.{LAYER_TENSORS[kind]}"] = _layer_loader(sources[name], kind, cfg.n_heads)
    return cfg, loaders


def _medusa_heads(path: Path, cfg: ModelConfig) -> dict[int, dict[str, Source]]:
    sources = file_sources(path)
    heads: dict[int, dict[str, Source]] = {}
    for name, source in sources.items():
        match = _MEDUSA_NAME.fullmatch(name)
        if not match:
            raise CheckpointError(
                f"--medusa-heads {path}: unexpected tensor {name}: the released heads have, per head i, "
                "i.0.linear.weight, i.0.linear.bias (one ResBlock) and i.1.weight (its output projection)"
            )
        heads.setdefault(int(match[1]), {})[match[2]] = source
    want = {"0.linear.weight": (cfg.dim, cfg.dim), "0.linear.bias": (cfg.dim,), "1.weight": (cfg.vocab_size, cfg.dim)}
    if sorted(heads) != list(range(len(heads))) or not heads:
        raise CheckpointError(f"--medusa-heads {path}: heads {sorted(heads)}; expected heads numbered 0, 1, ...")
    for i, head in heads.items():
        for kind, shape in want.items():
            if kind not in head:
                raise CheckpointError(f"--medusa-heads {path}: tensor {i}.{kind} is missing")
            if head[kind].shape != shape or head[kind].dtype not in hf.SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"--medusa-heads {path}: tensor {i}.{kind} is {head[kind].dtype} {list(head[kind].shape)}; the "
                    f"model (dim {cfg.dim}, vocabulary {cfg.vocab_size}) needs {list(shape)} (F32, BF16 or F16)"
                )
    return heads


def medusa_loaders(path: str | Path, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Callable[[], np.ndarray]]]:
    """cfg with the Medusa heads of medusa_lm_head.pt (or .safetensors), each with its own output
    projection, and a reader of each of their params by our names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--medusa-heads {path} does not exist: give the heads' {MEDUSA_FILE} file")
    heads = _medusa_heads(path, cfg)
    cfg = dataclasses.replace(cfg, medusa_heads=len(heads), medusa_own_lm_head=True)
    loaders = {}
    for i, head in heads.items():
        loaders[f"medusa.{i}.kernel"] = _llama_loader(head["0.linear.weight"], transposed=True)
        loaders[f"medusa.{i}.bias"] = head["0.linear.bias"].load
        loaders[f"medusa.{i}.lm_head.kernel"] = _llama_loader(head["1.weight"], transposed=True)
    return cfg, loaders


def read_medusa_heads(path: str | Path, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """medusa_loaders' config and the heads' params read."""
    cfg, loaders = medusa_loaders(path, cfg)
    return cfg, {name: load() for name, load in loaders.items()}


def model_dir_loaders(hf_dir: Path, medusa_heads: str | Path | None = None) -> tuple[ModelConfig, dict[str, Callable]]:
    """Config and a reader of each param from a Hugging Face LLaMA directory in any layout lin_llm
    reads: plain safetensors (lin_llm.io.hf), PyTorch .bin, or the released layout; plus the
    Medusa heads of ``medusa_heads`` (medusa_lm_head.pt), if given. Everything is validated first."""
    cfg, loaders = plan_model_dir(hf_dir) if _is_released(hf_dir) else hf.hf_loaders(hf_dir)
    if medusa_heads is not None:
        cfg, heads = medusa_loaders(medusa_heads, cfg)
        loaders.update(heads)
    return cfg, loaders


def read_model_dir(hf_dir: str | Path, medusa_heads: str | Path | None = None) -> tuple[ModelConfig, dict]:
    """Config and our flat params (in the config's dtypes) of model_dir_loaders."""
    cfg, loaders = model_dir_loaders(Path(hf_dir), medusa_heads)
    dtypes = {name: spec.dtype for name, spec in param_shapes(cfg).items()}
    return cfg, {name: np.asarray(load(), dtypes[name]) for name, load in loaders.items()}


def convert_model_dir(hf_dir: str | Path, out: str | Path, overwrite: bool = False,
                      medusa_heads: str | Path | None = None) -> ModelConfig:
    """``python -m lin_llm.convert --hf-dir DIR [--medusa-heads FILE]``: any directory read_model_dir
    reads, as a lin_llm checkpoint at ``out`` (validated completely before ``out`` is touched), one
    tensor in memory at a time."""
    hf_dir = require_model_directory(hf_dir, "--hf-dir")
    cfg, loaders = model_dir_loaders(hf_dir, medusa_heads)
    sources = (hf_dir,) if medusa_heads is None else (hf_dir, medusa_heads)
    with atomic_directory(out, overwrite, sources=sources) as tmp:
        write_model_dir(tmp, cfg, hf.lazy_params(cfg, loaders), hf_dir)
    return cfg


# --------------------------------------------------------------------------- ours -> released


def _torch_tensor(values: np.ndarray):
    torch = _torch()
    if values.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(values))  # a writable copy


def released_tensors(cfg: ModelConfig, flat) -> dict[str, np.ndarray]:
    """The extra tensors of the released layout (every layer's conv, its mask, alpha, lambda)."""
    tensors = {}
    for i in cfg.linear_layers:
        prefix = f"model.layers.{i}.self_attn."
        for theirs, ours in LAYER_TENSORS.items():
            name = f"layers.{i}.attn.{ours}"
            if name in flat:
                value = np.asarray(flat[name])
                tensors[prefix + theirs] = value[:, None, :, None] if ours == "conv" else value.reshape(1)
        if f"layers.{i}.attn.conv" in flat:
            tensors[prefix + CONV_MASK] = conv_mask()
    return tensors


def medusa_tensors(cfg: ModelConfig, flat) -> dict[str, np.ndarray]:
    """The own-projection Medusa heads as the original's medusa_head state dict (torch layouts)."""
    tensors = {}
    for i in range(cfg.medusa_heads):
        tensors[f"{i}.0.linear.weight"] = np.ascontiguousarray(np.asarray(flat[f"medusa.{i}.kernel"]).T)
        tensors[f"{i}.0.linear.bias"] = np.asarray(flat[f"medusa.{i}.bias"])
        tensors[f"{i}.1.weight"] = np.ascontiguousarray(np.asarray(flat[f"medusa.{i}.lm_head.kernel"]).T)
    return tensors


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False, softmax_only: bool = False,
                      max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES) -> hf.ExportPlan:
    """``python -m lin_llm.convert --to-hf``: the layout lin_llm.io.hf.check_exportable decides. The
    released one is safetensors (the LLaMA's tensors plus the conv, its mask, alpha and lambda by
    the original's names) and, for Medusa heads, medusa_lm_head.pt (torch.save of their state dict,
    the file the original's MedusaModel loads; config.json then also says medusa_num_heads)."""
    checkpoint = Path(checkpoint).absolute()
    cfg = read_model_config(checkpoint)
    plan = hf.check_exportable(cfg, softmax_only)
    if plan.layout == "hf":
        return hf.export_to_hf(checkpoint, out, overwrite, max_shard_bytes, softmax_only)
    torch = _torch() if cfg.medusa_heads else None  # before anything is written
    flat = flat_params(load_model_dir(checkpoint, cfg))
    config = hf.model_config_to_hf(cfg)
    if cfg.medusa_heads:
        config.update(medusa_num_heads=cfg.medusa_heads, medusa_num_layers=1)
    with atomic_directory(out, overwrite, sources=(checkpoint,)) as tmp:
        hf.write_hf_files(tmp, config, {**hf.llama_tensors(cfg, flat), **released_tensors(cfg, flat)}, max_shard_bytes)
        if torch is not None:
            torch.save({name: _torch_tensor(v) for name, v in medusa_tensors(cfg, flat).items()}, tmp / MEDUSA_FILE)
        copy_tokenizer_files(checkpoint, tmp)
    return plan
