"""The model with model.attention_impl selecting the Pallas kernels (interpret mode on CPU), and
a whole train step with the kernels lowered for TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lin_llm
import lin_llm.model
import pallas_kernels
from models import attention_overrides, tiny_model

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 260, size=(2, 70)))  # 70: not a multiple of G


def _model(name, impl):
    return tiny_model("model.n_layers=1", "model.dim=64", "model.vocab_size=260", "model.max_seq_len=1024",
                      *attention_overrides(name), f"model.attention_impl={impl}", "model.la.group_size=16",
                      "model.la.conv_kernel_size=63", seed=0)


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


_value_and_grad = nnx.jit(nnx.value_and_grad(_loss))


@pytest.mark.parametrize("name", ["aug", "global", "local_conv", "elu", "performer+conv", "castling", "flash", "hybrid-aug"])
def test_pallas_interpret_model_equals_xla_model(name):
    (loss_x, grads_x), (loss_p, grads_p) = (_value_and_grad(_model(name, impl), IDS) for impl in ("xla", "pallas_interpret"))
    assert abs(float(loss_x) - float(loss_p)) <= 1e-5 * abs(float(loss_x))
    for gx, gp in zip(jax.tree_util.tree_leaves(grads_x), jax.tree_util.tree_leaves(grads_p)):
        scale = max(float(jnp.abs(gx).max()), 1e-6)
        assert float(jnp.abs(gx - gp).max()) <= 1e-4 * scale


@pytest.mark.parametrize("name", ["yoso", "lolcats"])
def test_kernelless_presets_fall_back_to_xla_and_auto_is_xla_on_cpu(name):
    assert _model(name, "pallas_interpret").layers[0].attn.math.impl.name == "pallas_interpret"
    (loss_x, _), (loss_p, _) = (_value_and_grad(_model(name, impl), IDS) for impl in ("xla", "pallas_interpret"))
    # the same XLA chunked form: no kernel for YOSO's local kernel or lolcats' softmax window
    assert float(loss_x) == float(loss_p)
    assert _model("aug", "auto").layers[0].attn.math.impl.name == "xla"
    hybrid = _model("hybrid-aug", "pallas_interpret")  # the kernels run the linear layers; softmax stays softmax
    assert [block.attn.math and block.attn.math.impl.name for block in hybrid.layers] == [
        None, "pallas_interpret", None, "pallas_interpret", None]


def test_pallas_on_cpu_is_refused_at_build():
    with pytest.raises(ValueError, match="needs a TPU or GPU"):
        _model("aug", "pallas")


def test_whole_train_step_with_pallas_lowers_for_tpu(monkeypatch):
    monkeypatch.setattr(lin_llm.model, "select_impl", functools.partial(pallas_kernels.select_impl, platform="tpu"))
    cfg = lin_llm.load_config(None, [
        "model.n_layers=2", "model.dim=256", "model.n_heads=2", "model.n_kv_heads=2", "model.attention=aug",
        "model.attention_impl=pallas", "model.compute_dtype=bfloat16",
    ]).model
    model = nnx.eval_shape(lambda: lin_llm.model.LlamaModel(cfg, rngs=nnx.Rngs(0)))
    assert model.layers[0].attn.math.impl == pallas_kernels.Impl("pallas", "tpu")
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-3)
    opt_state = jax.eval_shape(tx.init, params)

    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), ids))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids = jax.ShapeDtypeStruct((2, 513), jnp.int32)
    lowered = jax.jit(train_step).trace(params, opt_state, ids).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert text.count("tpu_custom_call") >= 3 * cfg.n_layers  # forward + two backward kernels per layer
