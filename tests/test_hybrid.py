"""Hybrid models (model.softmax_layers): linearising a softmax checkpoint keeps its softmax layers
bit-identical, checkpoints round-trip, --to-hf refuses, and the layer-choice rules. The decoding
forms of hybrids are tested with every preset's (test_linear_attention.py, test_speculative.py),
distillation and sharding with training's (test_training.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from lin_llm import CheckpointError, ConfigError, load_checkpoint, save_model
from lin_llm.cli import convert, hybrid
from lin_llm.io.hf import check_exportable, export_to_hf
from lin_llm.layer_choice import every_kth, highest_transfer_loss
from lin_llm.model import flat_params
from lin_llm.training.distill import final_layer_losses
from models import tiny_model

IDS = jnp.asarray(np.random.RandomState(3).randint(0, 64, size=(2, 21)))


@pytest.fixture(scope="module")
def softmax_checkpoint(tmp_path_factory):
    """A five-layer softmax model with every parameter random (norms too), saved."""
    model = tiny_model("model.n_layers=5", "model.la.group_size=4", seed=2, norms=True)
    path = tmp_path_factory.mktemp("hybrid") / "softmax"
    save_model(model, path)
    return model, path


def test_linearising_into_a_hybrid_keeps_the_softmax_layers_bit_identical(softmax_checkpoint):
    softmax_model, path = softmax_checkpoint
    hybrid_model = load_checkpoint(path, overrides=["attention=aug", "softmax_layers=[0,2,4]"])
    assert hybrid_model.cfg.softmax_layers == (0, 2, 4) and hybrid_model.cfg.linear_layers == (1, 3)
    ours, theirs = flat_params(hybrid_model), flat_params(softmax_model)
    added = {f"layers.{i}.attn.{name}" for i in (1, 3) for name in ("mix_local", "mix_global", "conv")}
    assert set(ours) - set(theirs) == added and set(theirs) <= set(ours)  # only the linear layers gain params
    for name, value in theirs.items():
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(value), err_msg=name)
    # each block fed the same hidden states: a softmax layer's output is the softmax model's, bit for bit
    positions = jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape)
    x = softmax_model.embed(IDS)
    for i, (ours_block, theirs_block) in enumerate(zip(hybrid_model.layers, softmax_model.layers)):
        out, expected = ours_block(x, positions), theirs_block(x, positions)
        if i in (0, 2, 4):
            np.testing.assert_array_equal(np.asarray(out), np.asarray(expected), err_msg=f"layer {i}")
        else:  # a linear layer (local + global at init, the conv still zero) computes something else
            assert np.abs(np.asarray(out) - np.asarray(expected)).max() > 1e-2, i
        x = expected


def test_a_hybrid_checkpoint_round_trips_and_refuses_what_does_not_fit(softmax_checkpoint, tmp_path, capsys):
    _, path = softmax_checkpoint
    model = load_checkpoint(path, overrides=["attention=hedgehog+conv", "softmax_layers=[0,2,4]"])
    save_model(model, tmp_path / "hybrid")
    assert yaml.safe_load((tmp_path / "hybrid" / "config.yaml").read_text())["model"]["softmax_layers"] == [0, 2, 4]
    loaded = load_checkpoint(tmp_path / "hybrid")
    assert loaded.cfg == model.cfg and hash(loaded.cfg) == hash(model.cfg)
    np.testing.assert_array_equal(np.asarray(loaded(IDS)), np.asarray(model(IDS)))
    # linearising one more layer is allowed (it gains fresh params); making a linear layer softmax is not
    assert load_checkpoint(tmp_path / "hybrid", overrides=["softmax_layers=[0,2]"]).cfg.linear_layers == (1, 3, 4)
    with pytest.raises(CheckpointError, match=r"model.softmax_layers=\[0, 1, 2, 4\] .*unexpected \['layers.1.attn"):
        load_checkpoint(tmp_path / "hybrid", overrides=["softmax_layers=[0,1,2,4]"])
    # a hybrid is not a Hugging Face LLaMA: --to-hf refuses before writing anything
    message = r"linear attention \(model.attention='hedgehog\+conv'\) in layers \[1, 3\]; softmax in layers \[0, 2, 4\]"
    with pytest.raises(CheckpointError, match=message):
        export_to_hf(tmp_path / "hybrid", tmp_path / "hf")
    assert convert.main(["--to-hf", "--checkpoint", str(tmp_path / "hybrid"), "--out", str(tmp_path / "hf")]) == 2
    assert "a hybrid: the released layout, like the original code, linearises every layer" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    check_exportable(load_checkpoint(path).cfg)  # the softmax model itself exports


def test_every_kth_layer():
    assert every_kth(16, 4) == [3, 7, 11, 15]  # the 4th, 8th, ... counted from one
    assert every_kth(16, 4, offset=0) == [0, 4, 8, 12]
    assert every_kth(30, 7) == [6, 13, 20, 27]
    assert every_kth(5, 2, offset=1) == [1, 3]
    for args, message in [((16, 0), "k=0 must be >= 1"), ((16, 4, 4), r"offset=4 must be in \[0, 3\]"),
                          ((3, 1), "keeps every one of the 3 layers softmax"), ((3, 4), "keeps no layer")]:
        with pytest.raises(ConfigError, match=message):
            every_kth(*args)


def test_highest_transfer_loss():
    losses = {0: 0.10, 1: 0.40, 2: 0.05, 3: 0.40, 4: 0.30}
    assert highest_transfer_loss(losses, 1) == [1]  # a tie goes to the lower index
    assert highest_transfer_loss(losses, 3) == [1, 3, 4]
    assert highest_transfer_loss([0.2, 0.9, 0.1], 2) == [0, 1]
    with pytest.raises(ConfigError, match=r"n must be in \[1, 5\]"):
        highest_transfer_loss(losses, 6)


def test_final_layer_losses_average_the_last_tenth_of_the_steps():
    per_step = [np.array([10.0 + s, 20.0 + s]) for s in range(30)]  # layers 1 and 3; the last 3 steps: 27, 28, 29
    assert final_layer_losses((1, 3), per_step) == {1: 38.0, 3: 48.0}
    assert final_layer_losses((1, 3), per_step[:5]) == {1: 14.0, 3: 24.0}  # fewer than ten steps: the last one


def test_cli_every_prints_the_override(capsys):
    assert hybrid.main(["--every", "4", "model.n_layers=16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "model.softmax_layers=[3,7,11,15]"
    assert hybrid.main(["--every", "2", "--offset", "5", "model.n_layers=8"]) == 2
    assert "offset=5 must be in [0, 1]" in capsys.readouterr().err
    assert hybrid.main(["--highest", "2", "model.n_layers=8"]) == 2  # no transfer configured
    assert "set train.distill_steps > 0" in capsys.readouterr().err
