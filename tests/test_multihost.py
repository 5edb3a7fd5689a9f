"""Two processes on localhost (jax.distributed with gloo CPU collectives, 4 fake devices each)
train exactly the steps that one process with 8 devices trains."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from lin_llm import load_checkpoint, load_config
from lin_llm.model import flat_params
from lin_llm.sharding import maybe_initialize_distributed
from lin_llm.training import Trainer

# on 8 fake CPU devices, in a pytest process of their own (see the Makefile)
pytestmark = pytest.mark.multidevice

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=128", "model.attention=aug", "model.la.group_size=16", "train.seq_len=32",
    "train.batch_size=8", "train.steps=4", "train.eval_every=2", "train.save_every=2", "train.log_every=1",
    "train.val_batches=2", "train.warmup_steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~30-45 s: two JAX processes start, compile and talk over gloo
def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    out = tmp_path / "two"
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), "--no-progress",
             *ARGS, f"train.output_dir={out}", f"mesh.coordinator=127.0.0.1:{port}", "mesh.num_processes=2",
             f"mesh.process_id={i}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "2 processes" in outputs[0] and "summary:" in outputs[0]
    for line in ("mesh {", "val loss", "summary:"):  # only process 0 reports
        assert line not in outputs[1], outputs[1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer: each step once
    two = {r["step"]: r["loss"] for r in records if "loss" in r}
    two_val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*ARGS, f"train.output_dir={tmp_path / 'one'}"])
    trainer = Trainer(cfg, progress=False)
    try:
        one = trainer.run()
    finally:
        trainer.close()
    assert sorted(two) == [1, 2, 3, 4]
    for step, loss in one.losses.items():
        assert abs(loss - two[step]) < 1e-5, (step, loss, two[step])
    for step, loss in one.val.items():
        assert abs(loss - two_val[step]) < 1e-5
    # both wrote one checkpoint directory and one exported model; it loads and equals the 1-process one
    a = flat_params(load_checkpoint(out / "model"))
    b = flat_params(load_checkpoint(tmp_path / "one" / "model"))
    for name in a:
        assert abs(a[name] - b[name]).max() < 1e-5, name


def test_distributed_initialize_from_flags_or_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "LIN_LLM_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    plain = load_config(None).mesh
    assert not maybe_initialize_distributed(plain) and calls == []  # one host: nothing to initialise
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert maybe_initialize_distributed(plain)
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    # mesh.* (train.py's --coordinator / --num-processes / --process-id) win over the environment
    flags = load_config(None, ["mesh.coordinator=host0:99", "mesh.num_processes=2", "mesh.process_id=0"]).mesh
    assert maybe_initialize_distributed(flags)
    assert calls[-1] == {"coordinator_address": "host0:99", "num_processes": 2, "process_id": 0}
    # a TPU pod or SLURM: jax finds everything itself
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("LIN_LLM_DISTRIBUTED", "1")
    assert maybe_initialize_distributed(plain) and calls[-1] == {}
    assert len(calls) == 3
