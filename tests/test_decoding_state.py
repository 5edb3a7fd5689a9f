"""prefill followed by steps gives the logits of one full forward pass, at every position."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lin_llm import load_checkpoint

_step = nnx.jit(lambda model, tokens, state: model.step(tokens, state))
_prefill = nnx.jit(lambda model, ids, state: model.prefill(ids, state))


def _incremental_logits(model, ids, prefix_len, max_len):
    state = model.init_state(ids.shape[0], max_len)
    logits, state = _prefill(model, ids[:, :prefix_len], state)
    outs = [logits]
    for t in range(prefix_len, ids.shape[1]):
        step_logits, state = _step(model, ids[:, t], state)
        outs.append(step_logits[:, None])
    return jnp.concatenate(outs, axis=1), state


def test_prefill_then_steps_equal_full_forward(converted):
    model = load_checkpoint(converted["untied"])
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 97, size=(2, 40)))
    full = model(ids)
    for prefix_len in (1, 13):
        incremental, state = _incremental_logits(model, ids, prefix_len, max_len=64)
        np.testing.assert_allclose(np.asarray(incremental), np.asarray(full), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(state.pos), [40, 40])


def test_prefill_in_two_parts_equals_one(converted):
    model = load_checkpoint(converted["tied"])
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 97, size=(1, 30)))
    state = model.init_state(1, 32)
    first, state = _prefill(model, ids[:, :17], state)
    second, state = _prefill(model, ids[:, 17:], state)
    np.testing.assert_allclose(
        np.asarray(jnp.concatenate([first, second], axis=1)), np.asarray(model(ids)), rtol=0, atol=1e-4
    )


def test_state_is_a_fixed_shape_pytree(converted):
    model = load_checkpoint(converted["untied"])
    state = model.init_state(3, 16)
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 2 * model.cfg.n_layers + 1
    _, new_state = _step(model, jnp.zeros((3,), jnp.int32), state)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert [x.shape for x in jax.tree_util.tree_leaves(new_state)] == [x.shape for x in leaves]
