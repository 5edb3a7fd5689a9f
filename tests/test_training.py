"""Sharded training: 8 fake devices == 1 device, resume == uninterrupted, learning on the corpus,
LoRA / trainable regex / distillation / remat, Ctrl-C and crash-safe checkpoints, bad inputs."""

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import train as train_cli
from lin_llm import build_model, load_checkpoint, load_config, save_model, training
from lin_llm.layer_choice import recorded_transfer_losses
from lin_llm.model import flat_params
from lin_llm.sharding import MeshError
from lin_llm.training import MetricsWriter, Trainer, lr_schedule, make_optimizer, model_logits

# on 8 fake CPU devices, in a pytest process of their own (see the Makefile)
pytestmark = pytest.mark.multidevice

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "model.vocab_size=260", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.ffn_dim=128", "model.max_seq_len=128", "model.bos_id=256", "model.eos_id=257", "model.la.group_size=16",
    "train.seq_len=32", "train.batch_size=8", "train.steps=4", "train.eval_every=0", "train.save_every=0",
    "train.log_every=1", "train.val_batches=2", "train.warmup_steps=2",
]
ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


def tiny_cfg(out, *extra):
    return load_config(None, [*TINY, f"train.output_dir={out}", *extra])


def run(cfg, devices=None, resume=False, until=None):
    trainer = Trainer(cfg, resume=resume, progress=False, devices=devices)
    try:
        return trainer.run(until=until), trainer
    finally:
        trainer.close()


# --------------------------------------------------------------------------- sharding


def test_eight_device_step_equals_one_device_and_params_are_sharded(tmp_path):
    hybrid = ("model.attention=aug", "model.softmax_layers=[1]")  # layer 0 aug, layer 1 softmax
    one, _ = run(tiny_cfg(tmp_path / "one", *hybrid, *ONE_DEVICE), devices=jax.devices()[:1])
    cfg8 = tiny_cfg(tmp_path / "eight", *hybrid, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    trainer = Trainer(cfg8, progress=False)
    try:
        assert dict(trainer.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
        params = {**trainer.state["params"], **trainer.frozen}
        assert "layers.0.attn.conv" in params and not any(n.startswith("layers.1.attn.") and "kernel" not in n
                                                           for n in params)
        expected = {  # the rules: embed -> fsdp, heads/mlp/vocab(lm_head) -> tensor, table rows and the rest whole
            "embed.embedding": (P(None, "fsdp"), (260, 32)),
            "layers.0.attn.wq.kernel": (P("fsdp", "tensor"), (32, 32)),
            "layers.0.attn.wk.kernel": (P("fsdp", "tensor"), (32, 16)),
            "layers.0.attn.wo.kernel": (P("tensor", "fsdp"), (32, 32)),
            "layers.1.mlp.w_gate.kernel": (P("fsdp", "tensor"), (32, 64)),
            "layers.1.mlp.w_down.kernel": (P("tensor", "fsdp"), (64, 32)),
            "lm_head.kernel": (P("fsdp", "tensor"), (32, 130)),
            "norm.scale": (P(None), (64,)),
            "layers.0.attn.conv": (P(None, None), (4, 63)),
            "layers.0.attn.mix_global": (P(), ()),
        }
        for name, (spec, shard_shape) in expected.items():
            assert params[name].sharding.spec == spec, name
            assert params[name].addressable_shards[0].data.shape == shard_shape, name
            assert len(params[name].sharding.device_set) == 8
        # Adam's moments are placed like their params
        mu = trainer.state["opt"][1][0].mu
        assert mu["layers.0.attn.wq.kernel"].sharding.spec == P("fsdp", "tensor")
        batch = trainer.train_batch(0)
        assert batch.sharding.spec == P(None, ("data", "fsdp"), None)
        assert batch.addressable_shards[0].data.shape == (1, 2, 33)
        eight = trainer.run()
    finally:
        trainer.close()
    assert sorted(eight.losses) == [1, 2, 3, 4]
    for step in one.losses:
        assert abs(one.losses[step] - eight.losses[step]) < 1e-5, (step, one.losses[step], eight.losses[step])
    assert one.losses[4] < one.losses[1]  # the steps did train
    assert abs(one.final_val_loss - eight.final_val_loss) < 1e-5


def test_forward_with_constraints_and_remat_equals_model_call():
    cfg = load_config(None, [*TINY, "model.attention=aug", "model.n_layers=1"]).model
    model = build_model(cfg, seed=1)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 24)))
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda s: model_logits(nnx.merge(graphdef, s), ids))(state)
    theirs = jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)

    def loss(state, remat):
        return jnp.mean(model_logits(nnx.merge(graphdef, state), ids, remat=remat) ** 2)

    g0 = jax.jit(jax.grad(lambda s: loss(s, False)))(state)
    g1 = jax.jit(jax.grad(lambda s: loss(s, True)))(state)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)


# --------------------------------------------------------------------------- resume


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    # LoRA + a trainable regex + gradient accumulation + weight decay, on a hybrid (layer 0 softmax,
    # layer 1 aug): every piece of state matters
    extra = ["train.steps=6", "train.save_every=2", "train.lora_rank=4", "train.trainable=norm|embed",
             "train.grad_accum=2", "train.weight_decay=0.1", "train.eval_every=3", "model.attention=aug",
             "model.softmax_layers=[0]"]
    whole, _ = run(tiny_cfg(tmp_path / "whole", *extra), devices=jax.devices()[:4])
    first, _ = run(tiny_cfg(tmp_path / "split", *extra), devices=jax.devices()[:4], until=3)
    assert first.end_step == 3 and sorted(first.losses) == [1, 2, 3]
    steps = ocp.CheckpointManager((tmp_path / "split" / "checkpoints").absolute()).all_steps()
    assert 3 in steps  # stopping early saves where it stopped
    rest, _ = run(tiny_cfg(tmp_path / "split", *extra), devices=jax.devices()[:4], resume=True)
    assert rest.start_step == 3 and sorted(rest.losses) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first.losses[step] == whole.losses[step]
    for step in (4, 5, 6):
        assert rest.losses[step] == whole.losses[step], step
    assert rest.val[6] == whole.val[6]
    # the exported models are the same
    a = flat_params(load_checkpoint(tmp_path / "whole" / "model"))
    b = flat_params(load_checkpoint(tmp_path / "split" / "model"))
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_loss_decreases_on_the_embedded_corpus(tmp_path):
    result, _ = run(tiny_cfg(tmp_path, "train.steps=50", "train.learning_rate=3e-3", "train.warmup_steps=5",
                             "train.eval_every=50", *ONE_DEVICE), devices=jax.devices()[:1])
    first = np.mean([result.losses[s] for s in range(1, 6)])
    last = np.mean([result.losses[s] for s in range(46, 51)])
    assert first > 5.0  # ~ln(260) at the start
    assert last < first - 1.5, (first, last)
    assert result.final_val_ppl < 20.0, result.final_val_ppl
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 51))
    assert lines[-1]["summary"]["steps"] == 50


# --------------------------------------------------------------------------- checkpoints and metrics

# One compiled step shared by the tests below (the step cache keys on these fields).
CKPT = ["train.steps=4", "train.save_every=1", "train.keep_checkpoints=2", *ONE_DEVICE]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_are_async_keep_the_last_k_and_hold_the_whole_run(tmp_path, monkeypatch):
    # orbax finalises a save in _wait_for_checkpointers: on its own thread when the save is
    # async, inline (on the training thread) when it is not (orbax is pinned)
    on_main_thread = []
    original = ocp.CheckpointManager._wait_for_checkpointers

    def spy(self):
        on_main_thread.append(threading.current_thread() is threading.main_thread())
        return original(self)

    monkeypatch.setattr(ocp.CheckpointManager, "_wait_for_checkpointers", spy)
    result, _ = run(tiny_cfg(tmp_path, *CKPT), devices=jax.devices()[:1], until=3)
    assert result.end_step == 3
    assert on_main_thread == [False, False, False]  # steps 1, 2, 3, each finished in the background
    manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute(), item_names=("state", "meta"))
    assert manager.all_steps() == [2, 3]  # keep-last-K with K = 2
    meta = manager.restore(3, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert meta["step"] == 3
    assert meta["data"]["sequences_consumed"] == 3 * 8 and meta["data"]["fingerprint"]
    assert meta["config"]["model"]["dim"] == 64 and meta["config"]["train"]["keep_checkpoints"] == 2
    state = ocp.StandardCheckpointer().metadata(tmp_path.absolute() / "checkpoints" / "3" / "state").item_metadata
    assert sorted(state) == ["frozen", "opt", "params", "step"]
    assert "layers.0.attn.wq.kernel" in state["params"]


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    first, _ = run(tiny_cfg(tmp_path, *CKPT), devices=jax.devices()[:1], until=3)
    # as if the process died after logging step 3, before step 3's checkpoint was complete,
    # half-way through writing the next line
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    rest, _ = run(tiny_cfg(tmp_path, *CKPT), devices=jax.devices()[:1], resume=True)
    assert rest.start_step == 2 and sorted(rest.losses) == [3, 4]
    assert rest.losses[3] == first.losses[3]  # the replayed step
    records = _records(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [4]
    assert records[-1]["summary"]["steps"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["config.yaml", "metrics.jsonl"]


def test_a_fresh_run_does_not_append_to_an_old_runs_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n"
                                            + json.dumps({"summary": {"steps": 7}}) + "\n")
    MetricsWriter(tmp_path, True, start_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_only_process_zero_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training.metrics, "is_main", lambda: False)  # as on process 1 of 2
    trainer = Trainer(tiny_cfg(tmp_path, *CKPT, "train.export_model=false"), progress=True, devices=jax.devices()[:1])
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert sorted(result.losses) == [1, 2, 3, 4]  # it trained (every process computes) ...
    out, err = capsys.readouterr()
    assert "train" not in err and "summary" not in out and "mesh" not in out, (out, err)  # ... silently
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()


def test_tensorboard_is_used_when_installed_and_optional(tmp_path, monkeypatch):
    scalars = []

    class SummaryWriter:  # stands in for tensorboardX's
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step = log_dir, purge_step

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "tensorboardX", type(sys)("tensorboardX"))
    sys.modules["tensorboardX"].SummaryWriter = SummaryWriter
    writer = MetricsWriter(tmp_path, True, start_step=2)
    assert writer.tb.log_dir == str(tmp_path / "tensorboard")
    assert writer.tb.purge_step == 3  # resuming from step 2: events of steps 3.. are about to be replayed
    writer.write({"step": 3, "loss": 2.5, "tokens_per_s": float("nan")})
    writer.close()
    assert scalars == [("loss", 2.5, 3), "closed"]  # NaN (no rate measured yet) is not a scalar
    # without tensorboardX (and without tensorboard for torch's writer): JSON lines only
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    (tmp_path / "plain").mkdir()
    writer = MetricsWriter(tmp_path / "plain", True)
    assert writer.tb is None
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert _records(tmp_path / "plain") == [{"step": 1, "loss": 1.0}]


# --------------------------------------------------------------------------- optimizer


def test_lr_schedule_warm_up_then_cosine_or_constant():
    t = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.learning_rate=1e-2",
                           "train.min_lr_ratio=0.1"]).train
    lr = np.asarray([float(lr_schedule(t)(s)) for s in range(101)])
    np.testing.assert_allclose(lr[:10], 1e-2 * np.arange(1, 11) / 10, rtol=1e-6)  # linear warm-up
    np.testing.assert_allclose(lr[40], 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 30 / 90)), rtol=1e-6)  # cosine
    np.testing.assert_allclose(lr[100], 1e-3, rtol=1e-6)  # cosine down to learning_rate * min_lr_ratio
    assert np.all(np.diff(lr[10:]) <= 0)
    constant = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.learning_rate=1e-2",
                                  "train.lr_schedule=constant"]).train
    np.testing.assert_allclose([float(lr_schedule(constant)(s)) for s in (9, 50, 100)], 1e-2, rtol=1e-6)


def test_gradients_are_clipped_and_only_matrices_decay():
    t = load_config(None, ["train.grad_clip=1.0", "train.weight_decay=0.5", "train.learning_rate=0.1",
                           "train.warmup_steps=0", "train.lr_schedule=constant"]).train
    params = {"a.kernel": jnp.ones((2, 2)), "a.norm.scale": jnp.ones((2,))}
    tx = make_optimizer(t, lr_schedule(t), params)
    state = tx.init(params)
    big = {"a.kernel": jnp.full((2, 2), 30.0), "a.norm.scale": jnp.full((2,), 30.0)}  # global norm 30 sqrt(6)
    _, clipped = tx.update(big, state, params)
    norm = math.sqrt(6) * 30.0
    np.testing.assert_allclose(clipped[1][0].mu["a.kernel"], (1 - t.beta1) * 30.0 / norm, rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, params)  # no gradient: what moves is weight decay alone
    np.testing.assert_allclose(updates["a.kernel"], -0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(updates["a.norm.scale"], 0.0)
    unclipped = load_config(None, ["train.grad_clip=0", "train.warmup_steps=0"]).train
    tx = make_optimizer(unclipped, lr_schedule(unclipped), params)
    _, state = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(state[0][0].mu["a.kernel"], (1 - t.beta1) * 30.0, rtol=1e-5)


def test_grad_accumulation_bf16_compute_and_donation(tmp_path):
    base = ["train.steps=2", *ONE_DEVICE]
    whole, trainer = run(tiny_cfg(tmp_path / "whole", *base), devices=jax.devices()[:1])
    accum, _ = run(tiny_cfg(tmp_path / "accum", *base, "train.grad_accum=2"), devices=jax.devices()[:1])
    for step in (1, 2):  # two micro-batches of 4 = one batch of 8 (step 2's loss shows step 1's update)
        assert abs(whole.losses[step] - accum.losses[step]) < 1e-5, (step, whole.losses[step], accum.losses[step])
    assert abs(whole.final_val_loss - accum.final_val_loss) < 1e-5  # the same validation set, too
    # the step donates the old state: its buffers are reused, not copied
    old = trainer.state["params"]["layers.0.attn.wq.kernel"]
    trainer.state, _ = trainer.train_step(trainer.state, trainer.frozen, trainer.train_batch(2))
    assert old.is_deleted()
    # bf16 compute over fp32 master weights
    bf16, trainer = run(tiny_cfg(tmp_path / "bf16", *base, "model.compute_dtype=bfloat16"), devices=jax.devices()[:1])
    assert {v.dtype for v in trainer.state["params"].values()} == {jnp.dtype(jnp.float32)}
    assert bf16.losses[1] != whole.losses[1] and abs(bf16.losses[1] - whole.losses[1]) < 0.05
    assert abs(bf16.final_val_loss - whole.final_val_loss) < 0.05


# --------------------------------------------------------------------------- what trains


def test_lora_and_trainable_regex_freeze_the_rest(tmp_path):
    # on a hybrid (layer 0 aug, layer 1 softmax): LoRA on both layers' projections, the aug params frozen
    cfg = tiny_cfg(tmp_path, "train.steps=2", "train.lora_rank=2", "train.trainable=norm\\.scale$",
                   "train.learning_rate=1e-2", "model.attention=aug", "model.softmax_layers=[1]", *ONE_DEVICE)
    trainer = Trainer(cfg, progress=False, devices=jax.devices()[:1])
    try:
        before = {n: np.asarray(v) for n, v in flat_params(trainer.final_model()).items()}
        assert sorted(n for n in trainer.state["params"] if ":lora" not in n) == sorted(
            n for n in before if n.endswith("norm.scale"))
        assert len([n for n in trainer.state["params"] if ":lora" in n]) == 2 * 4 * 2  # q,k,v,o x 2 layers x (A, B)
        trainer.run()
        after = {n: np.asarray(v) for n, v in flat_params(load_checkpoint(tmp_path / "model")).items()}
    finally:
        trainer.close()
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        should = name.endswith("norm.scale") or any(f"attn.{w}.kernel" in name for w in ("wq", "wk", "wv", "wo"))
        assert changed == should, name
    assert "layers.0.attn.conv" in before and "layers.1.attn.conv" not in before


def test_distillation_fits_linear_attention_to_softmax(tmp_path, capsys):
    # a hybrid: layer 1 keeps softmax attention, so it is neither trained nor measured
    softmax = build_model(load_config(None, [*TINY, "model.init_std=0.2", "model.n_layers=3"]).model, seed=4)
    save_model(softmax, tmp_path / "softmax")
    cfg = tiny_cfg(tmp_path / "run", "model.init_std=0.2", "model.n_layers=3", "model.attention=hedgehog",
                   "model.softmax_layers=[1]", f"train.init_from={tmp_path / 'softmax'}",
                   "train.distill_steps=60", "train.distill_learning_rate=3e-2", "train.steps=1", *ONE_DEVICE)
    trainer = Trainer(cfg, progress=False, devices=jax.devices()[:1])
    try:
        losses = trainer.distill_losses
        assert len(losses) == 60 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
        layer_losses = trainer.distill_layer_losses
        assert sorted(layer_losses) == [0, 2] and all(0 < v < np.mean(losses[:5]) for v in layer_losses.values())
        # the loss is the mean over the linear layers; a layer's final loss averages the last tenth of the steps
        assert abs(np.mean(list(layer_losses.values())) - np.mean(losses[-6:])) < 1e-5 * np.mean(losses[-6:])
        # only the new params moved; the softmax weights are exactly the checkpoint's
        params = flat_params(trainer.final_model())
        ref = flat_params(softmax)
        for name, value in ref.items():
            np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(value))
        assert sorted(set(params) - set(ref)) == [f"layers.{i}.attn.hedgehog_{x}" for i in (0, 2) for x in "kq"]
        for i in (0, 2):
            assert not np.allclose(np.asarray(params[f"layers.{i}.attn.hedgehog_q"]), np.eye(16))
        trainer.run()  # the run records the per-layer losses, for choosing layers without a second transfer
        assert recorded_transfer_losses(tmp_path / "run") == layer_losses
        from lin_llm.cli import hybrid

        assert hybrid.main(["--highest", "1", "--from-run", str(tmp_path / "run")]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"model.softmax_layers=[{max(layer_losses, key=layer_losses.get)}]"
        assert hybrid.main(["--highest", "1", "--from-run", str(tmp_path)]) == 2
        assert "distill.json not found" in capsys.readouterr().err
    finally:
        trainer.close()


def test_choosing_softmax_layers_by_transfer_loss(tmp_path, capsys):
    softmax = build_model(load_config(None, [*TINY, "model.n_layers=3"]).model, seed=5)
    save_model(softmax, tmp_path / "softmax")
    from lin_llm.cli import hybrid

    argv = ["--highest", "2", "--no-progress", *TINY, "model.n_layers=3", "model.attention=hedgehog",
            "model.softmax_layers=[0]",  # ignored: the transfer runs with every layer linear
            f"train.init_from={tmp_path / 'softmax'}", "train.distill_steps=10", f"train.output_dir={tmp_path / 'x'}"]
    assert hybrid.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    rows = (re.match(r"\s+layer\s+(\d+)\s+([\d.]+)$", line) for line in out)
    losses = {int(m.group(1)): float(m.group(2)) for m in rows if m}
    assert sorted(losses) == [0, 1, 2] and all(v > 0 for v in losses.values())
    top2 = sorted(sorted(losses, key=lambda i: -losses[i])[:2])
    assert out[-1] == f"model.softmax_layers=[{','.join(map(str, top2))}]"
    assert not (tmp_path / "x").exists()  # nothing is kept


def test_medusa_objective_trains_only_the_heads(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.medusa_heads=2", "train.objective=medusa", "train.trainable=^medusa\\.",
                   "train.steps=3", "train.learning_rate=1e-2", *ONE_DEVICE)
    trainer = Trainer(cfg, progress=False, devices=jax.devices()[:1])
    try:
        assert trainer.plan.trainable == ["medusa.0.bias", "medusa.0.kernel", "medusa.1.bias", "medusa.1.kernel"]
        before = {n: np.asarray(v) for n, v in flat_params(trainer.final_model()).items()}
        result = trainer.run()
        after = {n: np.asarray(v) for n, v in flat_params(trainer.final_model()).items()}
    finally:
        trainer.close()
    assert result.losses[3] < result.losses[1]
    for name in before:
        assert (not np.array_equal(before[name], after[name])) == name.startswith("medusa."), name


# --------------------------------------------------------------------------- interruptions


def _cli_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), "--no-progress",
            *TINY[:9], "train.seq_len=32", "train.batch_size=8", "train.steps=100000", "train.save_every=0",
            "train.log_every=1", "train.val_batches=1", f"train.output_dir={tmp_path}"]
    proc = subprocess.Popen(args, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "checkpoint saved" in out, out
    steps = ocp.CheckpointManager(tmp_path.absolute() / "checkpoints").all_steps()
    assert len(steps) == 1 and steps[0] >= 3
    result, _ = run(load_config(ROOT / "configs" / "tiny.yaml", [*TINY[:9], "train.seq_len=32", "train.batch_size=8",
                                                                 f"train.steps={steps[0] + 2}", "train.log_every=1",
                                                                 "train.save_every=0", "train.val_batches=1",
                                                                 f"train.output_dir={tmp_path}", *ONE_DEVICE]),
                    devices=jax.devices()[:1], resume=True)
    assert result.start_step == steps[0] and result.end_step == steps[0] + 2


def test_an_interrupt_outside_the_loop_says_nothing_new_was_saved(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):  # e.g. a second Ctrl-C, or one while loading or exporting
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    code, err = _cli(capsys, *TINY, f"train.output_dir={tmp_path}")
    assert code == 130 and "Traceback" not in err
    assert f"interrupted: nothing new was saved; complete checkpoints in {tmp_path / 'checkpoints'} are kept" in err


def test_a_crash_during_a_save_never_leaves_a_checkpoint_that_restores(tmp_path):
    """SIGKILL the trainer while orbax is writing a checkpoint: the half-written one is not listed,
    and resuming takes the last complete one."""
    args = [sys.executable, str(ROOT / "train.py"), "--no-progress", *TINY, "train.steps=100000", "train.save_every=1",
            "train.keep_checkpoints=100", f"train.output_dir={tmp_path}", *ONE_DEVICE]
    proc = subprocess.Popen(args, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "checkpoints"
    caught = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and caught is None:
            if ckpts.is_dir():
                partial = [p for p in ckpts.iterdir() if "tmp" in p.name]
                complete = [p for p in ckpts.iterdir() if p.name.isdigit()]
                if partial and len(complete) >= 2:
                    proc.send_signal(signal.SIGKILL)
                    caught = partial
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert caught, "never saw a checkpoint being written"
    leftovers = [p for p in ckpts.iterdir() if not p.name.isdigit()]
    assert leftovers, "the kill should have left a partial checkpoint behind"
    manager = ocp.CheckpointManager(ckpts.absolute())
    latest = manager.latest_step()
    assert all(str(s) != p.name for p in leftovers for s in manager.all_steps())
    result, trainer = run(tiny_cfg(tmp_path, f"train.steps={latest + 1}", "train.save_every=1",
                                   "train.keep_checkpoints=100", *ONE_DEVICE), devices=jax.devices()[:1], resume=True)
    assert result.start_step == latest and result.end_step == latest + 1


# --------------------------------------------------------------------------- bad input


def _cli(capsys, *args):
    code = train_cli.main(["--no-progress", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.data=/nonexistent/corpus.txt"], r"no file matches '/nonexistent/corpus.txt'.*point train.data at"),
        (["train.seq_len=4096"], r"train.seq_len=4096 exceeds model.max_seq_len=128; lower train.seq_len or raise"),
        (["mesh.data=3"], r"mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but there are 8; make the product 8"),
        (["mesh.data=-1", "mesh.tensor=3"], r"multiply to 3, which does not divide the 8 devices"),
        (["mesh.data=8", "train.batch_size=4"], r"= 4 sequences per micro-batch does not divide over the 8 data-parallel"),
        (["mesh.data=4", "mesh.fsdp=2", "train.grad_accum=4"],
         r"train.batch_size / train.grad_accum = 2 sequences per micro-batch does not divide over the 8"),
        (["train.trainable=nothing_matches"], r"train.trainable='nothing_matches' matches no parameter"),
        (["train.distill_steps=5", "model.attention=aug"], r"train.distill_steps > 0 needs train.init_from"),
    ],
)
def test_bad_input_stops_before_training_with_a_message(tmp_path, capsys, extra, message):
    code, err = _cli(capsys, *TINY, f"train.output_dir={tmp_path}", *extra)
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    code, err = _cli(capsys, *TINY, f"train.output_dir={tmp_path / 'out'}", f"train.data={empty}")
    assert code == 2 and "contains no text" in err and "give a corpus with text" in err, err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("In the beginning.")
    code, err = _cli(capsys, *TINY, f"train.output_dir={tmp_path / 'out'}", f"train.data={tiny}")
    assert code == 2 and "too few for one training and one validation sequence" in err, err


def test_checkpoint_from_a_different_model_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--no-progress", *TINY, "train.steps=2", f"train.output_dir={out}"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]  # one closing line: final val perplexity and tokens/s
    assert re.fullmatch(r"summary: steps=2 val_loss=[\d.]+ val_ppl=[\d.]+ tokens_per_s=[\d.]+ attention=softmax", summary)
    # resuming with another model
    code, err = _cli(capsys, *TINY, "model.n_layers=3", f"train.output_dir={out}", "--resume")
    assert code == 2 and "different config: model.n_layers: checkpoint 2, config 3" in err, err
    assert "Set these fields back" in err
    # or another batch (the data position would not match)
    code, err = _cli(capsys, *TINY, "train.batch_size=16", f"train.output_dir={out}", "--resume")
    assert code == 2 and "train.batch_size: checkpoint 8, config 16" in err, err
    # starting again over existing checkpoints without --resume
    code, err = _cli(capsys, *TINY, f"train.output_dir={out}")
    assert code == 2 and "pass --resume to continue" in err, err
    # initialising from a checkpoint of another shape (attention may change: that is linearising)
    code, err = _cli(capsys, *TINY, "model.dim=32", f"train.init_from={out / 'model'}",
                     f"train.output_dir={tmp_path / 'other'}")
    assert code == 2 and "holds a different model: model.dim: checkpoint 64, config 32" in err, err
    code, _ = _cli(capsys, *TINY, "model.attention=aug", "train.steps=1",
                   f"train.init_from={out / 'model'}", f"train.output_dir={tmp_path / 'linear'}")
    assert code == 0


def test_mesh_shape_takes_the_rest_with_minus_one():
    from lin_llm.sharding import mesh_shape

    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).mesh
    assert mesh_shape(cfg, 8) == (2, 2, 2)
    with pytest.raises(MeshError, match="= 8 devices, but there are 4"):
        mesh_shape(cfg, 4)
    assert mesh_shape(load_config(None, ["mesh.data=-1", "mesh.tensor=2"]).mesh, 8) == (4, 1, 2)
