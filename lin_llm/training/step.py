"""The jitted train and eval steps: next-token (and Medusa) loss, AdamW after warm-up, LoRA merged
into the forward pass, explicit in/out shardings, the old state donated."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lin_llm import lora as lora_lib
from lin_llm import sharding as shd
from lin_llm.config import TrainConfig, field_names
from lin_llm.decoding.medusa import medusa_loss
from lin_llm.model import LlamaModel, unflatten

F32 = jnp.float32


def cross_entropy(logits, targets):
    """Mean next-token loss (all positions are real tokens: sequences are packed)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(F32), targets))


def model_logits(model: LlamaModel, ids, mesh=None, remat: bool = False):
    """= model(ids), with activation sharding constraints between blocks and optional remat."""
    constrain = None if mesh is None else (lambda x: shd.constrain(x, mesh, "batch", "length", "act_embed"))
    logits = model.logits(model.hidden(ids, remat=remat, constrain=constrain))
    return logits if mesh is None else shd.constrain(logits, mesh, "batch", "length", "act_vocab")


# --------------------------------------------------------------------------- optimizer


def lr_schedule(t: TrainConfig) -> Callable:
    """Linear warm-up to learning_rate over warmup_steps, then cosine / constant / linear decay
    to learning_rate * min_lr_ratio at train.steps."""
    peak, warm, total = t.learning_rate, t.warmup_steps, t.steps
    floor = peak * t.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, F32)
        warmup = peak * jnp.minimum(1.0, (step + 1) / max(warm, 1)) if warm else peak
        frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
        if t.lr_schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif t.lr_schedule == "linear":
            decayed = peak + (floor - peak) * frac
        else:
            decayed = jnp.asarray(peak, F32)
        return jnp.where(step < warm, warmup, decayed)

    return schedule


def _decays(name: str, ndim: int) -> bool:
    return ndim >= 2 and (name.endswith(("kernel", "embedding")) or lora_lib.is_lora(name))


def make_optimizer(t: TrainConfig, schedule, params_like: dict) -> optax.GradientTransformation:
    mask = {name: _decays(name, len(x.shape)) for name, x in params_like.items()}
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=mask))
    return optax.chain(*parts)


# --------------------------------------------------------------------------- the steps


def merged_model(graphdef, params: dict, frozen: dict, t: TrainConfig, replicated) -> LlamaModel:
    """The model from trained + frozen flat params, LoRA targets as W + alpha/r A B."""
    flat = {**frozen, **{n: v for n, v in params.items() if not lora_lib.is_lora(n)}}
    factors = {n: v for n, v in params.items() if lora_lib.is_lora(n)}
    if factors:
        flat = lora_lib.merge(flat, factors, t.lora_alpha, t.lora_rank)
    if "embed.embedding" in flat:  # FSDP: gather the table before the lookup (a gather from a
        # column-sharded table would otherwise be resharded to the batch layout the slow way)
        flat["embed.embedding"] = jax.lax.with_sharding_constraint(flat["embed.embedding"], replicated)
    return nnx.merge(graphdef, unflatten(flat))


def build_steps(graphdef, tx, schedule, t: TrainConfig, mesh, sh):
    """(train_step, eval_step), jitted with the shardings ``sh`` (training.state.Shardings); the
    train step donates the state.

    train_step(state, frozen, batch [accum, micro, T + 1]) -> (state, {loss, grad_norm, lr});
    eval_step(params, frozen, tokens [micro, T + 1]) -> mean loss.
    """

    def loss_fn(params, frozen, tokens):
        model = merged_model(graphdef, params, frozen, t, sh.replicated)
        tokens = shd.constrain(tokens, mesh, "batch", "length")
        loss = 0.0
        if t.objective in ("lm", "lm+medusa"):
            loss = cross_entropy(model_logits(model, tokens[:, :-1], mesh, t.remat), tokens[:, 1:])
        if t.objective in ("medusa", "lm+medusa"):
            loss = loss + medusa_loss(model, tokens[:, :-1])  # head i at t predicts t + i + 2
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state, frozen, batch):
        params = state["params"]
        if t.grad_accum == 1:
            loss, grads = grad_fn(params, frozen, batch[0])
        else:
            def micro_step(carry, tokens):
                return jax.tree.map(jnp.add, carry, grad_fn(params, frozen, tokens)), None

            zeros = (jnp.zeros((), F32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(micro_step, zeros, batch)
            loss, grads = jax.tree.map(lambda x: x / t.grad_accum, (loss, grads))
        updates, opt = tx.update(grads, state["opt"], params)
        new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt": opt}
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        return new, metrics

    train = jax.jit(train_step, in_shardings=(sh.state, sh.frozen, sh.batch), out_shardings=(sh.state, sh.replicated),
                    donate_argnums=(0,))
    evaluate = jax.jit(loss_fn, in_shardings=(sh.train, sh.frozen, sh.eval), out_shardings=sh.replicated)
    return train, evaluate


_STEPS: dict = {}  # compiled steps by (model config, step fields, mesh): a resumed run does not compile again


def cached_steps(cfg, mesh, make):
    """make() -> (train_step, eval_step), memoised for later Trainers of the same model, step
    config and mesh in this process (at most four kept)."""
    t = cfg.train
    key = (cfg.model, tuple(getattr(t, f) for f in field_names(TrainConfig, "step")), tuple(mesh.shape.items()),
           tuple(d.id for d in mesh.devices.flat))
    if key not in _STEPS:
        if len(_STEPS) >= 4:
            _STEPS.pop(next(iter(_STEPS)))
        _STEPS[key] = make()
    return _STEPS[key]
