"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place params and activations.

Every parameter gets logical axis names from PARAM_AXES (by its path, e.g.
``layers.0.attn.wq.kernel`` -> ("embed", "heads")), and LOGICAL_RULES maps logical names to
mesh axes, as MaxText does:

    batch -> (data, fsdp)   embed -> fsdp   heads, mlp, vocab (lm_head) -> tensor   the rest replicated

So FSDP shards every matrix along the model width and the batch along data x fsdp; tensor
parallelism splits heads, the MLP hidden width and the vocabulary. A dimension that the mesh
axis does not divide stays replicated. The same code runs on one
CPU device, 8 fake CPU devices, several hosts, and a TPU pod slice.
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lin_llm.config import MeshConfig
from lin_llm.errors import MeshError

AXES = ("data", "fsdp", "tensor")




# --------------------------------------------------------------------------- rules

LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_vocab": "tensor",
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "table_vocab": None,
    "heads": "tensor",  # the flattened (head, head_dim) axis of q/k/v/o projections
    "mlp": "tensor",
    "norm": None,
    "head_params": None,  # per-head linear-attention params (conv taps, Hedgehog maps): small
    "lora": None,
}

# (regex on the flat param path, logical axes of each dim). The first match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # the table's rows stay whole: a gather from a vocab-sharded table makes XLA replicate it
    (r"(^|\.)embed\.embedding$", ("table_vocab", "embed")),
    (r"\.attn\.(wq|wk|wv)\.kernel$", ("embed", "heads")),
    (r"\.attn\.wo\.kernel$", ("heads", "embed")),
    (r"\.mlp\.(w_gate|w_up)\.kernel$", ("embed", "mlp")),
    (r"\.mlp\.w_down\.kernel$", ("mlp", "embed")),
    (r"(^|\.)lm_head\.kernel$", ("embed", "vocab")),
    (r"norm\.scale$", ("norm",)),
    (r"\.attn\.conv$", ("head_params", None, None)),
    (r"\.attn\.hedgehog_[qk]$", ("head_params", None, None)),
    (r"\.attn\.mix_(local|global)$", ()),
    (r"(^|\.)medusa\.\d+\.kernel$", ("embed", None)),
)


def param_logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the param at ``name``; LoRA factors ``NAME:lora_a`` / ``NAME:lora_b``
    take the input / output axis of their base kernel."""
    base, _, lora = name.partition(":")
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, base):
            if lora == "lora_a":
                return (axes[0], "lora")
            if lora == "lora_b":
                return ("lora", axes[-1])
            return tuple(axes[:ndim]) + (None,) * max(0, ndim - len(axes))
    return (None,) * ndim  # unknown params are replicated


def _mesh_axes(logical: str | None) -> tuple[str, ...]:
    rule = LOGICAL_RULES.get(logical) if logical else None
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
    """PartitionSpec of logical axes; a dim that its mesh axes do not divide is replicated."""
    spec = []
    for i, name in enumerate(logical):
        axes = tuple(a for a in _mesh_axes(name) if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or (shape is not None and shape[i] % size != 0):
            spec.append(None)
        else:
            spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def named(mesh: Mesh, *logical: str | None, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(mesh, logical, shape))


def param_sharding(mesh: Mesh, name: str, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(mesh, param_logical_axes(name, len(shape)), shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Token batches: ``leading`` unsharded axes (e.g. grad accumulation), then the batch."""
    return NamedSharding(mesh, P(*([None] * leading), logical_to_spec(mesh, ("batch",))[0], *([None] * (ndim - 1))))


def constrain(x, mesh: Mesh, *logical: str | None):
    """with_sharding_constraint by logical axis names (inside jit)."""
    return jax.lax.with_sharding_constraint(x, named(mesh, *logical, shape=x.shape))


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a host array every process holds whole: each
    process fills only its own devices' shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# --------------------------------------------------------------------------- mesh


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Axis sizes, with -1 taking what the others leave; refuses what does not fit."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise MeshError(
                f"mesh {dict(zip(AXES, sizes))}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{n_devices} devices; change mesh.data/mesh.fsdp/mesh.tensor so their product divides {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {fixed} devices, but there are "
            f"{n_devices}; make the product {n_devices} (or set one axis to -1 to take the rest)"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all, every host's)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in _mesh_axes("batch"))


def check_batch(mesh: Mesh, micro_batch: int, what: str = "train.batch_size / train.grad_accum") -> None:
    dp = data_parallel_size(mesh)
    if micro_batch % dp:
        raise MeshError(
            f"{what} = {micro_batch} sequences per micro-batch does not divide over the {dp} data-parallel "
            f"devices (mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); make the "
            f"micro-batch a multiple of {dp}, or change the mesh"
        )


# --------------------------------------------------------------------------- multi-host


def maybe_initialize_distributed(cfg: MeshConfig) -> bool:
    """Call jax.distributed.initialize() when the config or the environment asks for it.

    Config fields win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID); on TPU pods and SLURM jax finds everything itself (set
    LIN_LLM_DISTRIBUTED=1 there). Returns whether it initialised. On CPU it uses gloo.
    """
    coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    auto = os.environ.get("LIN_LLM_DISTRIBUTED", "") == "1"
    if not coordinator and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    num = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if num:
        kwargs["num_processes"] = num
    if pid >= 0:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)
    return True
