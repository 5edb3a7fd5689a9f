"""What trains and where it lives: the split of the flat params into trainable / frozen / LoRA,
their shardings on the mesh, and the train state pytree {step, params, opt}."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from lin_llm import lora as lora_lib
from lin_llm import sharding as shd
from lin_llm.config import Config
from lin_llm.errors import TrainError
from lin_llm.model import param_shapes

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """Every param's shape and dtype (LoRA factors included) and which of them train."""

    shapes: dict[str, tuple]
    dtypes: dict[str, jnp.dtype]
    trainable: list[str]  # model params that train directly (train.trainable)
    frozen: list[str]  # model params that do not (the LoRA targets among them)
    lora: list[str]  # the frozen kernels that train through LoRA factors

    @property
    def train_names(self) -> list[str]:
        """What the optimizer updates: the trainable params and the LoRA factors."""
        return self.trainable + sorted(n for n in self.shapes if lora_lib.is_lora(n))


def plan_params(cfg: Config) -> ParamPlan:
    """The split train.trainable and train.lora_* make of ``cfg.model``'s params."""
    t = cfg.train
    specs = param_shapes(cfg.model)
    shapes = {n: tuple(s.shape) for n, s in specs.items()}
    dtypes = {n: s.dtype for n, s in specs.items()}
    lora = lora_lib.targets(shapes, t.lora_targets, t.lora_rank)
    trainable = [n for n in sorted(shapes) if re.search(t.trainable, n) and n not in lora]
    if t.lora_rank and not lora:
        raise TrainError(f"train.lora_targets={t.lora_targets!r} matches no parameter; e.g. {sorted(shapes)[:4]}")
    if not trainable and not lora:
        raise TrainError(
            f"train.trainable={t.trainable!r} matches no parameter and LoRA is off; parameter paths look like "
            f"{', '.join(sorted(shapes)[:3])}"
        )
    for name in lora:
        d_in, d_out = shapes[name]
        shapes[f"{name}:lora_a"], shapes[f"{name}:lora_b"] = (d_in, t.lora_rank), (t.lora_rank, d_out)
        dtypes[f"{name}:lora_a"] = dtypes[f"{name}:lora_b"] = jnp.dtype(F32)
    frozen = [n for n in sorted(specs) if n not in trainable]
    return ParamPlan(shapes, dtypes, trainable, frozen, lora)


@dataclasses.dataclass(frozen=True)
class Shardings:
    """Where each piece of the train state and each batch lives on the mesh."""

    params: dict[str, NamedSharding]  # every param and LoRA factor by name
    train: dict[str, NamedSharding]  # the optimizer's params
    frozen: dict[str, NamedSharding]
    opt: object  # the optimizer state's pytree of shardings
    batch: NamedSharding  # [grad_accum, micro, T + 1]
    eval: NamedSharding  # [micro, T + 1]
    replicated: NamedSharding

    @property
    def state(self) -> dict:
        return {"step": self.replicated, "params": self.train, "opt": self.opt}


def opt_state_shardings(abstract_opt, param_sh: dict, param_shapes: dict, mesh) -> object:
    """Each param-shaped leaf of the optimizer state (Adam's mu, nu) shards like its param."""
    repl = shd.replicated(mesh)

    def place(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in param_sh:
                return param_sh[name] if tuple(leaf.shape) == tuple(param_shapes[name]) else repl
        return repl

    return jax.tree_util.tree_map_with_path(place, abstract_opt)


def abstract_params(plan: ParamPlan, names) -> dict[str, jax.ShapeDtypeStruct]:
    return {n: jax.ShapeDtypeStruct(plan.shapes[n], plan.dtypes[n]) for n in names}


def build_shardings(plan: ParamPlan, mesh, tx) -> Shardings:
    params = {n: shd.param_sharding(mesh, n, plan.shapes[n]) for n in plan.shapes}
    train = {n: params[n] for n in plan.train_names}
    opt = opt_state_shardings(jax.eval_shape(tx.init, abstract_params(plan, plan.train_names)), train, plan.shapes, mesh)
    return Shardings(
        params=params, train=train, frozen={n: params[n] for n in plan.frozen}, opt=opt,
        batch=shd.batch_sharding(mesh, ndim=2, leading=1), eval=shd.batch_sharding(mesh, ndim=2),
        replicated=shd.replicated(mesh),
    )


def abstract_state(plan: ParamPlan, sh: Shardings, tx) -> dict:
    """The train state and frozen params as sharded ShapeDtypeStructs (what a restore fills)."""
    def spec(names, shardings):
        return {n: jax.ShapeDtypeStruct(plan.shapes[n], plan.dtypes[n], sharding=shardings[n]) for n in names}

    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(tx.init, abstract_params(plan, plan.train_names)), sh.opt)
    return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.replicated),
            "params": spec(plan.train_names, sh.train), "opt": opt, "frozen": spec(plan.frozen, sh.frozen)}


def fresh_state(plan: ParamPlan, sh: Shardings, tx, flat: dict, seed: int):
    """(state at step 0, frozen params) from every model param in ``flat``; LoRA factors drawn."""
    params = {n: flat[n] for n in plan.trainable}
    if plan.lora:
        rank = plan.shapes[f"{plan.lora[0]}:lora_a"][1]
        lora_sh = {n: sh.train[n] for n in sh.train if lora_lib.is_lora(n)}
        init = jax.jit(lambda: lora_lib.init(jax.random.key(seed + 1), {n: plan.shapes[n] for n in plan.lora}, rank),
                       out_shardings=lora_sh)
        params.update(init())
    opt = jax.jit(tx.init, out_shardings=sh.opt)(params)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), sh.replicated), "params": params, "opt": opt}
    return state, {n: flat[n] for n in plan.frozen}


def local_rows(sharding: NamedSharding, shape: tuple, axis: int) -> np.ndarray:
    """Rows (along ``axis``) of a global batch that this process's devices hold, in order."""
    spans = sorted({(s[axis].start or 0, s[axis].stop or shape[axis])
                    for s in sharding.addressable_devices_indices_map(shape).values()})
    return np.concatenate([np.arange(a, b) for a, b in spans])
