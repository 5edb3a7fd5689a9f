"""Attention transfer (LoLCATs stage 1): train only the new linear-attention params (or
train.distill_trainable) so that each layer's attention output matches the softmax layer's
(relative MSE), on the softmax model's own hidden states; everything else stays frozen. A hybrid's
softmax layers (model.softmax_layers) are the teacher's own: they are neither trained nor measured."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lin_llm import sharding as shd
from lin_llm.config import Config
from lin_llm.errors import TrainError
from lin_llm.model import abstract_model, attention_param_defaults, param_shapes, unflatten
from lin_llm.training import metrics
from lin_llm.training.state import opt_state_shardings

F32 = jnp.float32


def distilled_names(cfg: Config, names) -> list[str]:
    """The params attention transfer trains: train.distill_trainable, else those linear attention adds."""
    pattern = cfg.train.distill_trainable
    chosen = [n for n in sorted(names) if re.search(pattern, n)] if pattern else sorted(attention_param_defaults(cfg.model))
    if not chosen:
        raise TrainError(
            f"distillation has nothing to train: model.attention={cfg.model.attention!r} adds no parameters "
            "(set train.distill_trainable to a regex of params to train, or train.distill_steps=0)"
        )
    return chosen


def layer_attention_mse(student, teacher, ids, constrain=lambda x: x):
    """|student attn - teacher attn|^2 / |teacher attn|^2 of each linear-attention layer of the
    student ([len(linear_layers)]), each layer fed the teacher's own hidden states (the teacher's
    residual stream runs through every block). A hybrid's softmax layers are the teacher's own and
    are not measured."""
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    linear = set(student.cfg.linear_layers)
    x = teacher.embed(ids)
    losses = []
    for i, (student_block, teacher_block) in enumerate(zip(student.layers, teacher.layers)):
        normed = teacher_block.attn_norm(x)
        target = jax.lax.stop_gradient(teacher_block.attn(normed, positions))
        if i in linear:
            y_t, y_s = target.astype(F32), student_block.attn(normed, positions).astype(F32)
            losses.append(jnp.mean(jnp.square(y_s - y_t)) / jnp.maximum(jnp.mean(jnp.square(y_t)), 1e-12))
        x = constrain(teacher_block.finish(x, target))
    return jnp.stack(losses)


def final_layer_losses(layers, per_step: list) -> dict[int, float]:
    """{layer: relative MSE at the end of transfer} from per_step[i][j], layer layers[j]'s loss at
    step i: the mean over the last tenth of the steps (at least one), each measured on its batch
    before that batch's update."""
    tail = per_step[-max(1, len(per_step) // 10):]
    return {layer: float(value) for layer, value in zip(layers, np.mean(tail, axis=0))}


def attention_transfer(cfg: Config, flat: dict, param_sh: dict, eval_sh, mesh, batches: Callable[[int], jax.Array],
                       progress: Callable) -> tuple[dict, list[float], dict[int, float]]:
    """train.distill_steps Adam steps on the mean of layer_attention_mse; returns all params, the losses and each
    linear layer's final relative MSE (final_layer_losses). batches(i) is step i's token batch
    [micro, T + 1] on the mesh."""
    t = cfg.train
    names = distilled_names(cfg, flat)
    teacher_cfg = dataclasses.replace(cfg.model, attention="softmax", softmax_layers=())
    student_def = nnx.split(abstract_model(cfg.model))[0]
    teacher_def = nnx.split(abstract_model(teacher_cfg))[0]
    teacher_names = set(param_shapes(teacher_cfg))
    d_sh = {n: param_sh[n] for n in names}
    o_sh = {n: param_sh[n] for n in flat if n not in d_sh}
    constrain = lambda x: shd.constrain(x, mesh, "batch", "length", "act_embed")

    def loss_fn(dparams, others, tokens):
        every = {**others, **dparams}
        student = nnx.merge(student_def, unflatten(every))
        teacher = nnx.merge(teacher_def, unflatten({n: every[n] for n in teacher_names}))
        per_layer = layer_attention_mse(student, teacher, shd.constrain(tokens[:, :-1], mesh, "batch", "length"),
                                        constrain)
        return jnp.mean(per_layer), per_layer

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(t.distill_learning_rate))
    dparams = {n: flat[n] for n in names}
    others = {n: flat[n] for n in flat if n not in d_sh}
    shapes = {n: flat[n].shape for n in flat}
    opt_sh = opt_state_shardings(jax.eval_shape(tx.init, dparams), d_sh, shapes, mesh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(dparams)

    def step(dparams, opt, others, tokens):
        (loss, per_layer), grads = jax.value_and_grad(loss_fn, has_aux=True)(dparams, others, tokens)
        updates, opt = tx.update(grads, opt, dparams)
        return optax.apply_updates(dparams, updates), opt, loss, per_layer

    rep = shd.replicated(mesh)
    step = jax.jit(step, in_shardings=(d_sh, opt_sh, o_sh, eval_sh), out_shardings=(d_sh, opt_sh, rep, rep),
                   donate_argnums=(0, 1))
    bar = progress(range(t.distill_steps), "distill")
    losses, per_step = [], []
    for i in bar:
        dparams, opt, loss, per_layer = step(dparams, opt, others, batches(i))
        losses.append(loss)
        per_step.append(per_layer)
        if metrics.is_main() and hasattr(bar, "set_postfix") and (i % t.log_every == 0 or i == t.distill_steps - 1):
            bar.set_postfix(mse=f"{float(loss):.4f}")
    losses, per_step = jax.device_get((losses, per_step))
    losses = [float(x) for x in losses]
    layer_losses = final_layer_losses(cfg.model.linear_layers, per_step) if per_step else {}
    if losses:
        by_layer = ", ".join(f"{layer}: {value:.4f}" for layer, value in layer_losses.items())
        metrics.log(f"distillation: {t.distill_steps} steps, final relative attention MSE {losses[-1]:.4f} "
                    f"(per layer {by_layer})")
    return {**others, **dparams}, losses, layer_losses
