"""Our own checkpoints: save/load round trip, overrides, atomic writes."""

import jax.numpy as jnp
import numpy as np
import pytest

from lin_llm import CheckpointError, build_model, load_checkpoint, load_config, save_model
from lin_llm.io import checkpoint


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(load_config(None, ["model.n_layers=1", "model.tie_embeddings=true"]).model, seed=3)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids = jnp.arange(10)[None] % 7
    assert loaded.cfg == tiny_model.cfg
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(tiny_model(ids)))


def test_load_with_override_casts_compute(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", overrides=["compute_dtype=bfloat16"])
    assert loaded.cfg.compute_dtype == "bfloat16" and loaded.cfg.param_dtype == "float32"
    logits = loaded(jnp.arange(10)[None] % 7)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(tiny_model(jnp.arange(10)[None] % 7)), atol=0.1)
    with pytest.raises(CheckpointError, match="override .* invalid.*n_heads"):
        load_checkpoint(tmp_path / "ckpt", overrides=["n_heads=3"])


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    save_model(tiny_model, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(checkpoint, "write_model_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_model, out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    load_checkpoint(out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a lin_llm checkpoint .* nor a Hugging Face"):
        load_checkpoint(tmp_path / "empty")


def test_params_that_do_not_fit_the_config(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt")
    text = (tmp_path / "ckpt" / "config.yaml").read_text().replace("n_layers: 1", "n_layers: 2")
    (tmp_path / "ckpt" / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"params: parameters do not match .* missing \[.layers.1"):
        load_checkpoint(tmp_path / "ckpt")
