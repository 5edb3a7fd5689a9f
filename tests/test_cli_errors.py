"""Bad input to every CLI (issue #16): exit status 2, one paragraph naming the file/flag/field and
what to do, no traceback; nothing the tool did not write is replaced. The CLIs run in-process
(their main(argv)); test_no_cli_prints_a_traceback runs each entry point as a process."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lin_llm.cli import convert, decode, evaluate, train
from lin_llm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
GGUF_MAGIC = b"GGUF"


def refused(capsys, main, argv, *words):
    """Run main(argv): exit 2 and exactly one ``error:`` line holding every one of ``words``; (stdout, the line)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (argv, out, err)
    assert "Traceback" not in err, err
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    return out, errors[0]


@pytest.fixture
def hf_copy(hf_dirs, tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(hf_dirs["untied"], copy)
    return copy


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    return path


TRAIN = ("model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
         "train.steps=1", "train.batch_size=8", "train.seq_len=16", "--no-progress")


# --------------------------------------------------------------------------- 2. --overwrite


def test_overwrite_refuses_an_out_that_is_the_source(capsys, hf_copy):
    before = {p.name: p.read_bytes() for p in hf_copy.iterdir()}
    refused(capsys, convert.main, ["--hf-dir", hf_copy, "--out", hf_copy, "--overwrite"], str(hf_copy), "is the input")
    assert {p.name: p.read_bytes() for p in hf_copy.iterdir()} == before


def test_overwrite_refuses_an_out_that_contains_the_source(capsys, hf_copy):
    refused(capsys, convert.main, ["--hf-dir", hf_copy, "--out", hf_copy.parent, "--overwrite"], "contains the input")
    assert (hf_copy / "model.safetensors").is_file()


def test_overwrite_refuses_an_export_onto_its_checkpoint(capsys, tiny_checkpoint):
    refused(capsys, convert.main, ["--to-hf", "--checkpoint", tiny_checkpoint, "--out", tiny_checkpoint, "--overwrite"],
            "is the input")
    assert (tiny_checkpoint / "params").is_dir()


def test_overwrite_keeps_a_folder_lin_llm_did_not_write(capsys, hf_copy, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused(capsys, convert.main, ["--hf-dir", hf_copy, "--out", out, "--overwrite"], "notes.txt", "did not write",
            "--overwrite")
    assert (out / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_lin_llm_output_but_not_files_added_to_it(capsys, hf_copy, tmp_path):
    out = tmp_path / "out"
    assert convert.main(["--hf-dir", str(hf_copy), "--out", str(out)]) == 0
    assert convert.main(["--hf-dir", str(hf_copy), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / ".lin_llm-output.json").read_text())["written_by"] == "lin_llm"
    capsys.readouterr()
    (out / "added.txt").write_text("a user's file")
    refused(capsys, convert.main, ["--hf-dir", hf_copy, "--out", out, "--overwrite"], "added.txt", "did not write")
    assert (out / "added.txt").is_file() and (out / "params").is_dir()


# --------------------------------------------------------------------------- 4 and 8. sampling arguments


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--temperature", "1", "--top-p", "0"], ["top_p=0.0", "--top-p", "(0, 1]"]),
        (["--temperature", "1", "--top-p", "-1"], ["--top-p", "(0, 1]"]),
        (["--temperature", "1", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["--temperature", "nan"], ["--temperature", "finite"]),
        (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
        (["--top-k", "5"], ["--top-k", "temperature=0", "ignore"]),
        (["--top-p", "0.9"], ["--top-p", "temperature=0", "ignore"]),
        (["--medusa", "--top-k", "4"], ["--medusa", "greedy", "--top-k"]),
        (["--medusa", "--temperature", "0.7"], ["--medusa", "greedy", "--temperature"]),
        (["--temperature", "1", "--top-k", "0"], ["top_k=0", "--top-k", "vocabulary size 260"]),
        (["--temperature", "1", "--top-k", "-3"], ["top_k=-3", "--top-k", "vocabulary size 260"]),
        (["--temperature", "1", "--top-k", "261"], ["top_k=261", "--top-k", "vocabulary size 260"]),
    ],
)
def test_decode_refuses_bad_sampling_arguments_before_echoing_the_prompt(capsys, tiny_checkpoint, flags, words):
    out, _ = refused(capsys, decode.main, ["--checkpoint", tiny_checkpoint, "--prompt", "hi", *flags], *words)
    assert out == ""


def test_decode_refuses_a_prompt_that_is_not_utf8(capsys, tiny_checkpoint):
    # what Python makes of the bytes ff fe on a UTF-8 command line
    refused(capsys, decode.main, ["--checkpoint", tiny_checkpoint, "--prompt", "\udcff\udcfe"], "prompt", "UTF-8")


# --------------------------------------------------------------------------- 7. damaged files


@pytest.mark.parametrize("size", [0, 5, 1000, -100])
def test_truncated_safetensors_is_refused_by_convert_and_decode(capsys, hf_copy, tmp_path, size):
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: size if size >= 0 else len(data) + size])
    words = ["model.safetensors", "not a complete safetensors file", "download"]
    refused(capsys, convert.main, ["--hf-dir", hf_copy, "--out", tmp_path / "out"], *words)
    assert not (tmp_path / "out").exists()
    refused(capsys, decode.main, ["--checkpoint", hf_copy, "--prompt", "hi"], *words)


def test_truncated_safetensors_is_refused_as_train_init_from(capsys, hf_copy, tmp_path, text_file):
    (hf_copy / "model.safetensors").write_bytes(b"")
    refused(capsys, train.main, [*TRAIN, f"train.data={text_file}", f"train.init_from={hf_copy}",
                                 f"train.output_dir={tmp_path / 'run'}"], "train.init_from", "safetensors")


def test_invalid_config_json_is_refused(capsys, hf_copy, tmp_path):
    (hf_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    refused(capsys, convert.main, ["--hf-dir", hf_copy, "--out", tmp_path / "out"], "config.json", "not valid JSON")


def _damaged_copy(tiny_checkpoint, tmp_path, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint, copy)
    damage(copy / "params")
    return copy


def _truncate_data_chunks(params):
    for chunk in (params / "ocdbt.process_0" / "d").iterdir():
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda params: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in params.iterdir()],
         ["lists no arrays", "damaged"]),
        (lambda params: (params / "_METADATA").write_text((params / "_METADATA").read_text()[:40]),
         ["lists no arrays", "_METADATA"]),
        (_truncate_data_chunks, ["cannot be read", "damaged"]),
    ],
    ids=["emptied params", "truncated _METADATA", "truncated data chunks"],
)
def test_damaged_lin_llm_checkpoint_is_refused(capsys, tiny_checkpoint, tmp_path, damage, words):
    damaged = _damaged_copy(tiny_checkpoint, tmp_path, damage)
    refused(capsys, decode.main, ["--checkpoint", damaged, "--prompt", "hi"], str(damaged / "params"), *words)


def test_invalid_config_yaml_of_a_checkpoint_is_refused(capsys, tiny_checkpoint, tmp_path):
    damaged = _damaged_copy(tiny_checkpoint, tmp_path, lambda params: None)
    (damaged / "config.yaml").write_text("model: {dim: 32\n")
    refused(capsys, decode.main, ["--checkpoint", damaged, "--prompt", "hi"], "config.yaml", "YAML")


# --------------------------------------------------------------------------- 9. config syntax


def test_yaml_syntax_error_is_one_line_with_its_position(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [1\n")
    refused(capsys, train.main, ["--config", bad], str(bad), "not valid YAML", "line 2, column 8",
                      "fix the syntax")


def test_an_override_value_starting_with_a_bracket(capsys, tmp_path):
    assert load_config(None, ["train.trainable=[lm]_head"]).train.trainable == "[lm]_head"  # a regex, not a list
    refused(capsys, train.main, [*TRAIN, "model.softmax_layers=[0,", f"train.output_dir={tmp_path}"],
            "model.softmax_layers", "list of int")


# --------------------------------------------------------------------------- 11 and 12. training's inputs


def test_an_unwritable_output_dir_is_named_as_such(capsys, tmp_path, text_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, even by root
    _, line = refused(capsys, train.main, [*TRAIN, f"train.data={text_file}", f"train.output_dir={blocker / 'run'}"],
                      "train.output_dir", "cannot be written", "Not a directory")
    assert "train.data" not in line


@pytest.mark.parametrize(
    "content, words",
    [(b"", ["is empty (0 bytes)"]), (bytes(range(128, 256)) * 20, ["not UTF-8 text", "byte 0x80 at offset 0", "binary"])],
    ids=["empty", "binary"],
)
def test_an_empty_or_binary_data_file_says_why(capsys, tmp_path, content, words):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    refused(capsys, train.main, [*TRAIN, f"train.data={data}", f"train.output_dir={tmp_path / 'run'}"],
            "train.data", str(data), *words)


# --------------------------------------------------------------------------- 13. misleading messages


def test_decode_ends_the_echoed_prompt_before_an_error(capsys, tiny_checkpoint):
    out, _ = refused(capsys, decode.main, ["--checkpoint", tiny_checkpoint, "--prompt", "hi", "--max-new-tokens", "500"],
                     "exceeds the model's max_seq_len=128")
    assert out == "hi\n"  # not "hierror: ..."


@pytest.mark.parametrize("with_checkpoints", [True, False])
def test_a_training_run_directory_points_to_its_model(capsys, tiny_checkpoint, tmp_path, with_checkpoints):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "model")
    if with_checkpoints:  # a run that saved checkpoints; without: save_every=0, only the final model
        (run / "checkpoints").mkdir()
    shutil.copy(tiny_checkpoint / "config.yaml", run / "config.yaml")  # train.py writes the run's config there
    refused(capsys, decode.main, ["--checkpoint", run, "--prompt", "hi"], "training run", str(run / "model"))


@pytest.mark.parametrize("flag", ["--hf-dir", "--checkpoint"])
def test_a_gguf_file_given_as_a_directory_says_to_convert_it(capsys, tmp_path, flag):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(GGUF_MAGIC)
    main, argv = (convert.main, ["--out", tmp_path / "out"]) if flag == "--hf-dir" else (decode.main, ["--prompt", "x"])
    refused(capsys, main, [flag, gguf, *argv], str(gguf), "GGUF file", "--gguf")


def test_evaluate_refuses_a_missing_checkpoint(capsys, tmp_path, text_file):
    refused(capsys, evaluate.main, ["--checkpoint", tmp_path / "missing", "--data", text_file], "does not exist")


# --------------------------------------------------------------------------- no traceback, as processes


def test_no_cli_prints_a_traceback(tmp_path, hf_copy, tiny_checkpoint):
    """Each entry point as a user runs it, on a bad input from the issue: exit 2, one ``error:``
    paragraph on stderr, no traceback (nor the asyncio noise of a damaged checkpoint's reads)."""
    (hf_copy / "model.safetensors").write_bytes(b"")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  dim: [1\n")
    damaged = _damaged_copy(tiny_checkpoint, tmp_path, _truncate_data_chunks)
    commands = [
        ["-m", "lin_llm.convert", "--hf-dir", hf_copy, "--out", tmp_path / "out"],
        [ROOT / "decode.py", "--checkpoint", damaged, "--prompt", "hi"],
        [ROOT / "decode.py", "--checkpoint", tiny_checkpoint, "--prompt", "hi", "--temperature", "1", "--top-k", "0"],
        [ROOT / "train.py", "--config", bad_yaml],
        ["-m", "lin_llm.evaluate", "--checkpoint", tmp_path / "missing", "--data", bad_yaml],
        ["-m", "lin_llm.hybrid", "--every", "0"],
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, *map(str, c)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    for command, proc in zip(commands, procs):
        _, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, (command, err)
        assert not re.search(r"Traceback|Event loop is closed|Future exception", err), (command, err)
