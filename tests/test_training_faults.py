"""Training faults: a corrupted checkpoint array is refused, SIGTERM saves and --resume reproduces the
uninterrupted losses, a damaged latest checkpoint falls back to the newest intact one, resume compares
data by content, metrics.jsonl is strict JSON. One device, a tiny model, a small corpus."""

import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train as train_cli
from lin_llm import CheckpointError, build_model, load_checkpoint, load_config, save_model
from lin_llm.errors import TrainError
from lin_llm.io import checksums
from lin_llm.model import flat_params
from lin_llm.training import Trainer, loop

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.yaml"
# every in-process run below shares this model, step config and mesh, so one compiled step; they stop
# with `until` (train.steps is part of the compiled step's schedule)
ARGS = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
    "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.steps=100000", "train.warmup_steps=2",
    "train.eval_every=0", "train.log_every=1", "train.val_batches=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 40 kB of the embedded corpus: quick to tokenise in a subprocess too."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    with lzma.open(ROOT / "data" / "kjv.txt.xz", "rt") as f:
        path.write_text(f.read(40_000))
    return path


def cfg_of(out, data, *extra):
    return load_config(CONFIG, [*ARGS, f"train.data={data}", f"train.output_dir={out}", *extra])


def run(cfg, resume=False, until=None):
    trainer = Trainer(cfg, resume=resume, progress=False, devices=jax.devices()[:1])
    try:
        return trainer.run(until=until)
    finally:
        trainer.close()


def overwrite_inside(directory: Path) -> Path:
    """Overwrite 16 bytes in the middle of the largest data file under ``directory`` (a params chunk)."""
    big = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\x7f" * 16
    big.write_bytes(bytes(data))
    return big


def strict_records(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- checksums (item 5)


def test_a_corrupted_model_checkpoint_array_is_refused(tmp_path):
    model = build_model(load_config(None, ["model.n_layers=1", "model.dim=64", "model.ffn_dim=128"]).model, seed=3)
    out = tmp_path / "ckpt"
    save_model(model, out)
    saved = checksums.read_file(out)
    original = {n: np.asarray(v) for n, v in flat_params(model).items()}
    assert saved == {n: checksums.digest(v) for n, v in original.items()}  # sha256 of each array's bytes
    load_checkpoint(out)  # intact: loads
    overwrite_inside(out / "params")
    # orbax itself does not notice: without the checksums the altered values load silently
    (out / checksums.FILE).rename(tmp_path / "saved.json")
    silently = flat_params(load_checkpoint(out))
    assert any(not np.array_equal(np.asarray(silently[n]), original[n]) for n in original)
    (tmp_path / "saved.json").rename(out / checksums.FILE)
    with pytest.raises(CheckpointError, match=rf"the checkpoint {out} is damaged: 1 array\(s\) differ from their "
                                              r"saved sha256 \(.+\)\. .*restore it from a good copy"):
        load_checkpoint(out)


# --------------------------------------------------------------------------- SIGTERM (item 14)


def test_sigterm_saves_a_checkpoint_and_resume_reproduces_the_uninterrupted_losses(tmp_path, corpus):
    out = tmp_path / "terminated"
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG), "--no-progress", *ARGS,
            f"train.data={corpus}", f"train.output_dir={out}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    output, _ = proc.communicate(timeout=120)
    assert time.time() - sent < 30, "SIGTERM took more than a step and a checkpoint to stop training"
    assert proc.returncode == 143, output  # exited itself (not killed by the signal: that is -15)
    assert "SIGTERM: stopping after this step and saving a checkpoint" in output and "checkpoint saved" in output
    assert "Traceback" not in output, output
    steps = ocp.CheckpointManager((out / "checkpoints").absolute()).all_steps()
    assert len(steps) == 1 and steps[0] >= 3, steps
    k = steps[0]
    logged = {r["step"]: r["loss"] for r in strict_records(metrics) if "loss" in r}
    assert sorted(logged) == list(range(1, k + 1))

    whole = run(cfg_of(tmp_path / "whole", corpus), until=k + 2)
    rest = run(cfg_of(out, corpus), resume=True, until=k + 2)
    assert rest.start_step == k and sorted(rest.losses) == [k + 1, k + 2]
    for step in (k + 1, k + 2):
        assert rest.losses[step] == whole.losses[step], step
    for step in range(1, k + 1):  # the terminated process trained the same steps
        assert logged[step] == whole.losses[step], step


def test_sigterm_outside_the_loop_stops_at_once_and_keeps_the_checkpoints(tmp_path, capsys, monkeypatch):
    def terminated_while_loading(*args, **kwargs):  # e.g. while restoring, distilling or exporting
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(loop, "Trainer", terminated_while_loading)
    before = signal.getsignal(signal.SIGTERM)
    code = train_cli.main(["--no-progress", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err
    assert f"terminated: nothing new was saved; complete checkpoints in {tmp_path / 'checkpoints'} are kept" in err
    assert signal.getsignal(signal.SIGTERM) == before  # restored


# --------------------------------------------------------------------------- damaged checkpoints (item 15)


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_newest_intact_one_resumed(tmp_path, corpus, capsys):
    cfg = cfg_of(tmp_path, corpus, "train.save_every=1", "train.keep_checkpoints=4")
    first = run(cfg, until=4)
    ckpts = tmp_path / "checkpoints"
    assert ocp.CheckpointManager(ckpts.absolute()).all_steps() == [1, 2, 3, 4]
    overwrite_inside(ckpts / "4" / "state")  # bytes altered inside an array: caught by its sha256
    big = max((p for p in (ckpts / "3" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])  # a truncated data file: orbax cannot read it
    capsys.readouterr()
    rest = run(cfg, resume=True, until=4)
    log = capsys.readouterr().out
    assert rest.start_step == 2 and sorted(rest.losses) == [3, 4]
    assert rest.losses == {3: first.losses[3], 4: first.losses[4]}
    aside = tmp_path / "damaged-checkpoints"
    assert (f"checkpoint {ckpts / '4'} is damaged (1 array(s) differ from their saved sha256 ("
            in log and f"moved to {aside / '4'}" in log)
    assert f"checkpoint {ckpts / '3'} is damaged (ValueError: OUT_OF_RANGE: Error reading" in log
    assert f"moved to {aside / '3'}" in log
    assert f"resumed from {ckpts / '2'} (step 2)" in log
    assert sorted(p.name for p in aside.iterdir()) == ["3", "4"]  # kept, not deleted
    assert (aside / "4" / "state").is_dir()
    assert ocp.CheckpointManager(ckpts.absolute()).all_steps() == [1, 2, 3, 4]  # 3 and 4 written again


def test_no_intact_checkpoint_is_refused_and_nothing_is_moved(tmp_path, corpus):
    cfg = cfg_of(tmp_path, corpus, "train.save_every=1", "train.keep_checkpoints=2")
    run(cfg, until=2)
    ckpts = tmp_path / "checkpoints"
    overwrite_inside(ckpts / "2" / "state")
    (ckpts / "1" / "meta" / "metadata").write_text('{"step": 1, "conf')  # torn JSON
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(TrainError, match=rf"no intact checkpoint in {ckpts} to resume from: step 2: 1 array\(s\) "
                                         r"differ from their saved sha256 .*; step 1: JSONDecodeError: .+\. Restore them from a "
                                         "good copy, or start again in another train.output_dir"):
        run(cfg, resume=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------- data identity (item 16)


def test_resume_compares_the_data_not_how_its_path_is_spelled(tmp_path, corpus, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(corpus, data / "x.txt")
    out = tmp_path / "run"
    run(cfg_of(out, data / "x.txt", "train.save_every=1"), until=2)  # an absolute path
    monkeypatch.chdir(tmp_path)
    resumed = Trainer(cfg_of(out, "./data/x.txt"), resume=True, progress=False, devices=jax.devices()[:1])
    resumed.close()
    assert int(resumed.state["step"]) == 2
    shutil.copy(corpus, data / "copy.txt")  # another file, the same text: the same data
    same = Trainer(cfg_of(out, "data/copy.txt"), resume=True, progress=False, devices=jax.devices()[:1])
    same.close()
    assert int(same.state["step"]) == 2
    (data / "x.txt").write_text(corpus.read_text()[:-2000])  # the same path, other text
    with pytest.raises(TrainError, match=rf"trained on different data: train.data={data / 'x.txt'}, now "
                                         rf"train.data={data / 'x.txt'} \(tokens fingerprint \w+, now \w+\); resume "
                                         "with the same data"):
        Trainer(cfg_of(out, "./data/x.txt"), resume=True, progress=False, devices=jax.devices()[:1])


# --------------------------------------------------------------------------- strict metrics (item 17)


def test_metrics_are_strict_json_also_when_a_finished_run_is_resumed(tmp_path, corpus):
    cfg = cfg_of(tmp_path, corpus, "train.steps=2")
    run(cfg)
    path = tmp_path / "metrics.jsonl"
    # as an older version wrote it: NaN for a rate it could not measure
    path.write_text(path.read_text().replace('"grad_norm": ', '"grad_norm": NaN, "old": ', 1))
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_records(path)
    again = run(cfg, resume=True)  # nothing left to train: no rate measured
    assert again.start_step == again.end_step == 2 and np.isnan(again.tokens_per_s)
    records = strict_records(path)
    summaries = [r["summary"] for r in records if "summary" in r]
    assert len(summaries) == 2 and summaries[-1]["tokens_per_s"] is None and summaries[0]["tokens_per_s"] > 0
    assert records[0]["grad_norm"] is None  # the old NaN, rewritten as null
