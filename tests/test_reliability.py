"""Reliability of the input and output layers (issue #16): the prompt's BOS rule against
transformers, sampling and prompt checks in the API, leftovers of killed writes, Ctrl-C while
decoding, and conversion that streams one tensor at a time."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from lin_llm import generate, speculative_generate
from lin_llm.cli import decode
from lin_llm.decoding.text import decode_tokens, encode_prompt
from lin_llm.errors import CheckpointError, DecodeError
from lin_llm.io import streaming
from lin_llm.io.atomic import MARKER, atomic_directory, clean_leftovers
from lin_llm.io.checkpoint import restore_params
from lin_llm.io.gguf import convert_gguf_to_checkpoint, read_gguf
from lin_llm.io.hf import convert_hf_to_checkpoint, model_config_from_hf
from lin_llm.tokenizer import model_tokenizer
from models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


def _cli_env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- 3. one BOS rule


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory):
    """SmolLM2's tokenizer files as lin_llm writes them from the GGUF (no tensor data read), and its config.json."""
    gguf = read_gguf(smollm2_gguf)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    for name, text in gguf.tokenizer_files.items():
        (out / name).write_text(text, encoding="utf-8")
    return out, gguf.hf_config


def test_decode_encodes_the_prompt_as_transformers_does(smollm2_tokenizer_dir):
    """SmolLM2's tokenizer adds no BOS, and its bos_id is <|im_start|>: decode.py's ids are transformers'."""
    from transformers import AutoTokenizer

    directory, hf_config = smollm2_tokenizer_dir
    cfg = model_config_from_hf(hf_config, "float32")
    ids = encode_prompt(model_tokenizer(directory, cfg), PROMPT)
    assert ids == AutoTokenizer.from_pretrained(directory)(PROMPT).input_ids
    assert cfg.bos_id == 1 and ids[0] != cfg.bos_id


def test_decode_cli_continues_the_text_transformers_continues(smollm2_tokenizer_dir, tmp_path, capsys):
    """A tiny random LLaMA with SmolLM2's vocabulary and tokenizer: decode.py's greedy text is
    transformers' greedy continuation of the same prompt."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hf_reference import save_tiny_hf_llama

    directory, _ = smollm2_tokenizer_dir
    hf_dir = save_tiny_hf_llama(tmp_path / "hf", tie=True, vocab_size=49152, initializer_range=1.0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).write_text((directory / name).read_text())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert decode.main(["--checkpoint", str(hf_dir), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == PROMPT + expected + "\n"


# --------------------------------------------------------------------------- 4. sampling and prompt checks in the API


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=float("nan")), r"temperature=nan \(--temperature\) must be a finite number >= 0"),
        (dict(temperature=float("inf")), r"temperature=inf"),
        (dict(temperature=-1.0), r"temperature=-1.0"),
        (dict(temperature=1.0, top_p=0.0), r"top_p=0.0 \(--top-p\) must be a number in \(0, 1\]"),
        (dict(temperature=1.0, top_p=-1.0), r"top_p=-1.0"),
        (dict(temperature=1.0, top_p=1.5), r"top_p=1.5"),
        (dict(temperature=1.0, top_k=0), r"top_k=0 \(--top-k\) must be an integer from 1 to the vocabulary size 64"),
        (dict(temperature=1.0, top_k=65), r"top_k=65"),
        (dict(temperature=1.0, top_k=2.5), r"top_k=2.5"),
        (dict(top_k=4), r"top_k \(--top-k\) shapes sampling, but temperature=0 .* would ignore it"),
        (dict(top_k=4, top_p=0.5), r"top_k \(--top-k\) and top_p \(--top-p\) shape sampling"),
    ],
)
def test_generate_refuses_bad_sampling_arguments(kwargs, message):
    model = tiny_model()
    for call in (lambda: generate(model, [[1, 2, 3]], 4, **kwargs),
                 lambda: speculative_generate(model, model, [[1, 2, 3]], 4, **kwargs)):
        with pytest.raises(DecodeError, match=message):
            call()


def test_medusa_refuses_sampling_arguments():
    model = tiny_model("model.medusa_heads=2")
    for kwargs in (dict(temperature=0.5), dict(top_k=3), dict(top_p=0.9)):
        with pytest.raises(DecodeError, match=r"Medusa decoding \(--medusa\) is greedy: it would ignore"):
            decode_tokens(model, [1, 2, 3], 4, medusa_topk=(2, 2), **kwargs)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[1, -1, 3]], r"prompt 0 has token id -1 at position 1, outside the model's vocabulary \[0, 64\)"),
        ([[1, 2], [5, 64, 6]], r"prompt 1 has token id 64 at position 1"),
        (np.array([[1, 2**33]]), r"no token id"),
        ([[1.0, 2.0]], r"holds float64 values, not token ids"),
    ],
)
def test_generate_refuses_token_ids_outside_the_vocabulary(prompts, message):
    model = tiny_model()
    with pytest.raises(DecodeError, match=message):
        generate(model, prompts, 4)
    with pytest.raises(DecodeError, match=message):
        speculative_generate(model, model, prompts, 4)


def test_the_limits_of_the_sampling_arguments_are_accepted():
    model = tiny_model()
    vocab = model.cfg.vocab_size
    full = np.asarray(generate(model, [[1, 2, 3]], 4, temperature=1.0, seed=3))
    # top_k = the whole vocabulary and top_p = 1 keep every token: the same draws as no filter
    kept = generate(model, [[1, 2, 3]], 4, temperature=1.0, top_k=vocab, top_p=1.0, seed=3)
    np.testing.assert_array_equal(np.asarray(kept), full)


# --------------------------------------------------------------------------- 6. leftovers of killed writes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_write_is_cleaned_by_the_next_one(hf_dirs, tmp_path):
    """SIGKILL a process inside atomic_directory: its .partial-* directory stays; the next conversion
    to that output removes it (and says so), and the output is complete."""
    out = tmp_path / "out"
    script = (f"import time; from lin_llm.io.atomic import atomic_directory\n"
              f"with atomic_directory({str(out)!r}) as tmp:\n"
              f"    (tmp / 'big').write_bytes(bytes(1 << 20)); print('writing', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=_cli_env())
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    leftover = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(leftover) == 1 and (leftover[0] / "big").is_file()
    result = subprocess.run([sys.executable, "-m", "lin_llm.convert", "--hf-dir", str(hf_dirs["untied"]), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=_cli_env())
    assert result.returncode == 0, result.stderr
    assert f"note: removed {leftover[0]}, left by an interrupted write of {out} (process {proc.pid})" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / MARKER).is_file()


def test_leftovers_that_may_be_in_use_are_reported_not_removed(tmp_path, capsys):
    out = tmp_path / "model"
    host = socket.gethostname()
    dead = tmp_path / f".model.partial-{_dead_pid()}@{host}-abc123"
    running = tmp_path / f".model.partial-{os.getpid()}@{host}-def456"
    elsewhere = tmp_path / f".model.partial-{os.getpid()}@another-host-x1-ghi789"
    legacy = tmp_path / ".model.partial-k2j4h5g6"  # named by an earlier lin_llm: no process to check
    previous = tmp_path / f".model.old-{_dead_pid()}@{host}-jkl012"  # killed between its two renames
    other = tmp_path / ".other.partial-k2j4h5g6"
    for path in (dead, running, elsewhere, legacy, previous / "model", other):
        path.mkdir(parents=True)
    assert clean_leftovers(out) == [dead]
    err = " ".join(capsys.readouterr().err.split())
    assert f"{running} is a partial write of {out} by process {os.getpid()} on {host}" in err
    assert f"{elsewhere} is a partial write of {out} by process {os.getpid()} on another-host-x1" in err
    assert f"{legacy} is a partial write of {out} by an earlier lin_llm version" in err
    assert f"{previous} holds the previous version of {out}" in err and f"move {previous / 'model'} back" in err
    assert all(p.exists() for p in (running, elsewhere, legacy, previous, other)) and not dead.exists()


def test_a_failed_write_leaves_nothing_and_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("crash")
    assert (out / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((out / MARKER).read_text())["entries"] == ["v"]


# --------------------------------------------------------------------------- 10. Ctrl-C while decoding


def test_ctrl_c_while_decoding_exits_130_at_once(tiny_checkpoint):
    args = [sys.executable, str(ROOT / "decode.py"), "--checkpoint", str(tiny_checkpoint), "--prompt", "hi",
            "--max-new-tokens", "100000", "--override", "max_seq_len=100008", "--override", "eos_id=null"]
    proc = subprocess.Popen(args, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(40)  # the prompt and generated text: the token loop is running
    start = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    elapsed = time.time() - start
    err = err.decode(errors="replace")
    assert proc.returncode == 130 and elapsed < 10, (proc.returncode, elapsed, err)
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith("interrupted: generation stopped after ") and err.strip().endswith(" tokens")
    assert out.endswith(b"\n")


# --------------------------------------------------------------------------- 18. streaming conversion


def test_lazy_tensors_are_produced_and_written_one_at_a_time(tmp_path, monkeypatch):
    """With BYTES_IN_FLIGHT below one tensor, each tensor is produced only after the previous one is
    written and released; with room for three, never more than three are held. The checkpoint
    restores to the values produced."""
    for limit, most in ((0, 1), (3 * 4096 * 4, 3)):
        monkeypatch.setattr(streaming, "BYTES_IN_FLIGHT", limit)
        alive, peak = set(), [0]

        def tensor(i):
            def load():
                gc.collect()
                peak[0] = max(peak[0], len(alive) + 1)
                values = np.full((64, 64), i, np.float32)
                alive.add(i)
                weakref.finalize(values, alive.discard, i)
                return values

            return streaming.LazyTensor((64, 64), np.dtype(np.float32), load)

        directory = tmp_path / f"limit-{limit}"
        streaming.save_params(directory, {f"t{i}": tensor(i) for i in range(6)})
        assert peak[0] == most
        import orbax.checkpoint as ocp

        restored = ocp.StandardCheckpointer().restore(directory)
        assert all((np.asarray(restored[f"t{i}"]) == i).all() for i in range(6))


def test_a_non_finite_gguf_tensor_stops_the_conversion(hf_dirs, tmp_path, capfd):
    from gguf_files import write_llama_gguf

    gguf = write_llama_gguf(tmp_path / "nan.gguf", hf_dirs["untied"],
                            replace={"blk.1.ffn_up.weight": np.full((96, 64), np.nan, np.float32)})
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.up_proj.weight dequantizes to non-finite"):
        convert_gguf_to_checkpoint(gguf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]  # no output, no partial directory
    assert "Traceback" not in capfd.readouterr().err


def test_hf_conversion_writes_what_the_files_hold(hf_dirs, tmp_path):
    from safetensors.numpy import load_file

    cfg = convert_hf_to_checkpoint(hf_dirs["untied"], tmp_path / "out")
    params = restore_params(tmp_path / "out", cfg)
    hf = load_file(hf_dirs["untied"] / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(params["layers.1.attn.wq.kernel"]), hf["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["embed.embedding"]), hf["model.embed_tokens.weight"])


@pytest.mark.slow
def test_converting_smollm2_holds_about_one_tensor_beyond_the_interpreter(smollm2_gguf, tmp_path):
    """Peak RSS of `python -m lin_llm.convert --gguf` on SmolLM2-135M (538 MB of float32 weights,
    largest tensor 113 MB): 1.77 GB before streaming, about 0.7 GB now (the interpreter with JAX
    and orbax imported is about 0.3 GB). The peak is the child's own VmHWM: its ru_maxrss starts at
    the parent's peak (Linux carries it over fork and exec), which in a pytest process that has
    loaded SmolLM2 is gigabytes."""
    script = ("import runpy, sys\n"
              f"sys.argv = ['convert', '--gguf', {str(smollm2_gguf)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
              "try:\n    runpy.run_module('lin_llm.convert', run_name='__main__')\nexcept SystemExit as end:\n"
              "    assert not end.code, end.code\n"
              "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=_cli_env())
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split()[-1]) / 1024
    assert 300 < peak_mb < 900, peak_mb


# --------------------------------------------------------------------------- quickstart --fresh


def test_fresh_deletes_only_a_work_directory_a_pipeline_made(tmp_path):
    from lin_llm.errors import LinLLMError
    from lin_llm.pipeline import WORK_MARKER, work_directory

    work = work_directory(tmp_path / "work")
    assert (work / WORK_MARKER).is_file()
    (work / "stage").mkdir()
    work_directory(work)  # reused as it is
    assert (work / "stage").is_dir()
    work_directory(work, fresh=True)
    assert sorted(p.name for p in work.iterdir()) == [WORK_MARKER]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    work_directory(mine)  # the pipeline may write into it, but it stays the user's
    assert not (mine / WORK_MARKER).exists()
    with pytest.raises(LinLLMError, match=r"--fresh deletes the work directory, and .*mine was not made by lin_llm"):
        work_directory(mine, fresh=True)
    assert (mine / "thesis.txt").read_text() == "years of work"


def test_quickstart_fresh_refuses_a_users_directory_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = subprocess.run([sys.executable, str(ROOT / "quickstart.py"), "--fresh", "--workdir", str(mine)],
                            cwd=tmp_path, capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --fresh deletes the work directory") and "Traceback" not in result.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
