"""lin_llm.evaluation and `python -m lin_llm.evaluate`: perplexity against transformers by the
guide's own loop, passkey prompts and scoring, the CLI end to end and each of its refusals."""

import gzip
import json
import lzma
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lin_llm import load_checkpoint
from lin_llm.cli.evaluate import main
from lin_llm.errors import EvaluationError
from lin_llm.evaluation import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    passkey_accuracy,
    passkey_correct,
    passkey_plan,
    passkey_prompt,
    sliding_window_perplexity,
)
from lin_llm.tokenizer import ByteTokenizer, load_tokenizer, model_tokenizer

REPO = Path(__file__).resolve().parent.parent
BOS = 1  # the tiny HF LLaMA's bos_token_id


def kjv_excerpt(n_chars: int) -> str:
    with lzma.open(REPO / "data" / "kjv.txt.xz", "rt") as f:
        return f.read(200_000)[100_000 : 100_000 + n_chars]


def build_tokenizer_json(path: Path) -> Path:
    """A small SentencePiece-style BPE (<= 97 tokens, the tiny model's vocabulary) that prepends
    <s> through its post-processor, as LLaMA's tokenizer.json does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION, "0123456789", kjv_excerpt(20_000)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=97, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    assert tok.get_vocab_size() <= 97 and tok.token_to_id("<s>") == BOS
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def ckpt_with_tokenizer(converted, tmp_path_factory):
    """The converted tiny HF LLaMA with a tokenizer.json beside it."""
    out = tmp_path_factory.mktemp("eval") / "with_tokenizer"
    shutil.copytree(converted["untied"], out)
    build_tokenizer_json(out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def hf_model(hf_dirs):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dirs["untied"], dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def model(converted):
    return load_checkpoint(converted["untied"])


# --------------------------------------------------------------------------- transformers' guide


def guide_windows(ids, max_length, stride):
    """(input_ids, target_ids) of each step of the guide's loop, written as the guide writes it."""
    import torch

    encodings = torch.as_tensor(np.asarray(ids)[None], dtype=torch.long)
    seq_len = encodings.size(1)
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        yield input_ids, target_ids
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break


def guide_perplexity(hf_model, ids, max_length, stride):
    """The guide's loop verbatim: each window's mean loss weighted by num_valid_tokens - 1."""
    import torch

    nll_sum, n_tokens = 0.0, 0
    for input_ids, target_ids in guide_windows(ids, max_length, stride):
        with torch.no_grad():
            neg_log_likelihood = hf_model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
    return math.exp(nll_sum / n_tokens)


def guide_exact(hf_model, ids, max_length, stride):
    """The same windows and labels, each scored token's NLL summed exactly: (ppl, tokens scored).
    (The guide's weighting counts one token too few in windows whose first label is masked.)"""
    import torch

    nll, count = 0.0, 0
    for input_ids, target_ids in guide_windows(ids, max_length, stride):
        with torch.no_grad():
            logits = hf_model(input_ids).logits[0, :-1].double()
        labels = target_ids[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
        nll += losses[labels != -100].sum().item()
        count += int((labels != -100).sum())
    return math.exp(nll / count), count


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("seq_len,stride", [(32, 32), (32, 12), (48, 20)])
def test_perplexity_equals_transformers_guide(model, hf_model, seq_len, stride):
    ids = np.concatenate([[BOS], np.random.default_rng(seq_len + stride).integers(3, 97, 149)])
    ours = sliding_window_perplexity(model, ids, seq_len, stride, batch_size=3)
    exact, count = guide_exact(hf_model, ids, seq_len, stride)
    assert ours.tokens == count == (len(ids) - 1 if stride < seq_len else len(ids) - math.ceil(len(ids) / seq_len))
    assert abs(ours.perplexity / exact - 1) < 1e-5
    assert abs(ours.nll - math.log(exact)) < 1e-5
    assert abs(ours.perplexity / guide_perplexity(hf_model, ids, seq_len, stride) - 1) <= 5e-3
    assert ours.tokens_per_s > 0


def test_perplexity_refusals(model):
    ids = np.arange(3, 60)
    with pytest.raises(EvaluationError, match="fewer than one window of seq_len=64"):
        sliding_window_perplexity(model, ids, 64)
    with pytest.raises(EvaluationError, match="max_seq_len=128"):
        sliding_window_perplexity(model, np.arange(200) % 90, 129)
    with pytest.raises(EvaluationError, match="stride=40 must be between 1 and seq_len=32"):
        sliding_window_perplexity(model, ids, 32, 40)


# --------------------------------------------------------------------------- tokenizer BOS rule


def test_bos_comes_from_the_tokenizers_own_rule(ckpt_with_tokenizer, tmp_path):
    hf = load_tokenizer(ckpt_with_tokenizer, bos_id=BOS, eos_id=2)
    assert hf.encode("In the beginning", add_special_tokens=True) == [BOS] + hf.encode("In the beginning")
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(ckpt_with_tokenizer / "tokenizer.json"))
    plain.post_processor = None  # like SmolLM2's: no BOS
    plain.save(str(tmp_path / "tokenizer.json"))
    no_bos = load_tokenizer(tmp_path, bos_id=BOS, eos_id=2)
    assert no_bos.encode("In the beginning", add_special_tokens=True) == hf.encode("In the beginning")
    assert load_tokenizer(None, bos_id=256).encode("ab", add_special_tokens=True) == [256, 97, 98]
    assert load_tokenizer(None, bos_id=None).encode("ab", add_special_tokens=True) == [97, 98]


# --------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_is_the_text_with_the_key_at_its_depth(depth):
    tok = ByteTokenizer(prepend_bos=True)
    prompt = passkey_prompt(tok, 1000, depth, "40213")
    units = (1000 - len(PASSKEY_INTRO) - 1 - len(PASSKEY_NEEDLE.format(key="40213")) - len(PASSKEY_QUESTION)) // len(
        PASSKEY_FILLER
    )
    before = round(depth * units)
    expected = PASSKEY_INTRO + PASSKEY_FILLER * before + PASSKEY_NEEDLE.format(key="40213")
    expected += PASSKEY_FILLER * (units - before) + PASSKEY_QUESTION
    assert prompt.ids[0] == ByteTokenizer.bos_id and tok.decode(prompt.ids) == expected
    assert 1000 - len(PASSKEY_FILLER) < len(prompt.ids) <= 1000
    start, end = prompt.needle
    assert tok.decode(prompt.ids[start:end]) == PASSKEY_NEEDLE.format(key="40213")
    assert start == 1 + len(PASSKEY_INTRO) + before * len(PASSKEY_FILLER)
    assert prompt.answer_tokens == len(" 40213") + 2


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.6, 1.0])
def test_passkey_prompt_token_positions_with_a_bpe_tokenizer(ckpt_with_tokenizer, depth):
    tok = load_tokenizer(ckpt_with_tokenizer, bos_id=BOS, eos_id=2)
    prompt = passkey_prompt(tok, 1500, depth, "77031")
    start, end = prompt.needle
    head = len(tok.encode(PASSKEY_INTRO, add_special_tokens=True))
    filler = len(tok.encode("Go." + PASSKEY_FILLER)) - len(tok.encode("Go."))
    question = len(tok.encode("Go." + PASSKEY_QUESTION)) - len(tok.encode("Go."))
    filler_tokens = len(prompt.ids) - head - (end - start) - question
    assert prompt.ids[0] == BOS and len(prompt.ids) <= 1500 and filler_tokens % filler == 0
    assert abs((start - head) / filler_tokens - depth) <= filler / filler_tokens / 2 + 1e-9
    assert tok.decode(prompt.ids[start:end]).strip() == PASSKEY_NEEDLE.format(key="77031").strip()
    outside = tok.decode(prompt.ids[:start]) + tok.decode(prompt.ids[end:])
    assert "77031" not in outside and "pass key? The pass key is" in outside


@pytest.mark.parametrize(
    "answer,right",
    [(" 40213.", True), ("40213", True), (" The pass key is 40213", True), (" 402130", False), (" 4021", False),
     (" 40213"[:-1] + "4", False), ("", False), (" forty", False), (" 1 40213", False), (" -40213", True)],
)
def test_passkey_scorer_is_exact(answer, right):
    assert passkey_correct(answer, "40213") is right


def test_passkey_plan_keys_are_seeded_and_contexts_checked(model, ckpt_with_tokenizer):
    tok = load_tokenizer(ckpt_with_tokenizer, bos_id=BOS, eos_id=2)
    long_model = load_checkpoint(ckpt_with_tokenizer, overrides=["max_seq_len=2048"])
    a = passkey_plan(long_model, tok, [400, 600], depths=[0.0, 1.0], trials=3, seed=5)
    b = passkey_plan(long_model, tok, [400, 600], depths=[0.0, 1.0], trials=3, seed=5)
    c = passkey_plan(long_model, tok, [400, 600], depths=[0.0, 1.0], trials=3, seed=6)
    keys = [p.key for p in a.prompts[400]]
    assert keys == [p.key for p in b.prompts[400]] != [p.key for p in c.prompts[400]]
    assert len(a.prompts[600]) == 6 and all(len(k) == 5 and k.isdigit() for k in keys)
    with pytest.raises(EvaluationError, match="does not fit the model's max_seq_len=128"):
        passkey_plan(model, tok, [1000])
    with pytest.raises(EvaluationError, match="context of 60 tokens is too short"):
        passkey_plan(long_model, tok, [600, 60])


def test_passkey_accuracy_scores_each_answer_against_its_own_key(model, monkeypatch):
    """Answers stand in for the model (a random one never recalls): each must be scored against
    its own prompt's key across batches, and the hits land in their (context, depth) cells."""
    from lin_llm import evaluation

    tok = ByteTokenizer(prepend_bos=True)
    long_model = load_checkpoint_like(model, max_seq_len=4096)
    plan = passkey_plan(long_model, tok, [700, 900], depths=[0.0, 0.5, 1.0], trials=2, seed=3)
    prompts = [p for c in plan.contexts for p in plan.prompts[c]]
    right = {0, 1, 2, 5, 7, 11}  # indices (context-major, then depth, then trial) answered right
    answers = {tuple(p.ids): (f" {p.key}." if i in right else f" {int(p.key) + 1}.") for i, p in enumerate(prompts)}
    batches = []

    def fake_generate(model, prompt_ids, max_new_tokens, eos_id=None):
        batches.append(len(prompt_ids))
        rows = [tok.encode(answers[tuple(ids)])[:max_new_tokens] for ids in prompt_ids]
        return np.array([row + [ByteTokenizer.eos_id] * (max_new_tokens - len(row)) for row in rows])

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    got = passkey_accuracy(long_model, tok, plan, batch_size=4)
    assert got == {700: {0.0: 1.0, 0.5: 0.5, 1.0: 0.5}, 900: {0.0: 0.5, 0.5: 0.0, 1.0: 0.5}}
    assert batches == [4, 4, 4, 4]  # the short last batches are filled up


def load_checkpoint_like(model, **overrides):
    """``model``'s weights under a config with ``overrides`` (only max_seq_len matters here)."""
    import dataclasses

    from lin_llm.io.checkpoint import model_from_flat_params
    from lin_llm.model import flat_params

    return model_from_flat_params(dataclasses.replace(model.cfg, **overrides), flat_params(model))


@pytest.mark.slow
def test_smollm2_retrieves_passkeys_at_512_and_1024_tokens(smollm2_checkpoint):
    """The real teacher finds every key hidden anywhere but at depth 1.0. There, with the needle's
    last words ("... is the pass key.") just before the question, SmolLM2-135M often answers
    " the pass key." instead (3 of 8 keys right at 256 tokens; transformers' greedy generate gives
    the same answers), so that depth is measured (see the README) but not asserted here."""
    model = load_checkpoint(smollm2_checkpoint)
    tokenizer = model_tokenizer(smollm2_checkpoint, model.cfg)
    plan = passkey_plan(model, tokenizer, [512, 1024], depths=[0.0, 0.25, 0.5, 0.75], trials=2)
    accuracy = passkey_accuracy(model, tokenizer, plan, batch_size=8)
    assert accuracy == {c: {0.0: 1.0, 0.25: 1.0, 0.5: 1.0, 0.75: 1.0} for c in (512, 1024)}


# --------------------------------------------------------------------------- the CLI


def test_cli_end_to_end_matches_transformers_and_writes_the_heat_map(ckpt_with_tokenizer, hf_model, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast

    text = kjv_excerpt(3000)
    data = tmp_path / "excerpt.txt.gz"
    data.write_bytes(gzip.compress(text.encode()))
    heatmap = tmp_path / "plots" / "passkey.png"
    argv = ["--checkpoint", str(ckpt_with_tokenizer), "--data", str(data), "--seq-len", "32", "--stride", "12",
            "--max-tokens", "300", "--override", "max_seq_len=1024", "--passkey", "--contexts", "300", "420",
            "--depths", "0", "1", "--trials", "1", "--heatmap", str(heatmap), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    ids = PreTrainedTokenizerFast(tokenizer_file=str(ckpt_with_tokenizer / "tokenizer.json"))(text).input_ids[:300]
    assert ids[0] == BOS
    exact, count = guide_exact(hf_model, ids, 32, 12)
    assert result["tokens"] == count == 299
    assert abs(result["perplexity"] / exact - 1) < 1e-5
    assert abs(result["perplexity"] / guide_perplexity(hf_model, ids, 32, 12) - 1) <= 5e-3
    assert set(result) == {"perplexity", "tokens", "tokens_per_s", "passkey", "passkey_by_depth"}
    assert set(result["passkey"]) == {"300", "420"} and all(0 <= a <= 1 for a in result["passkey"].values())
    assert set(result["passkey_by_depth"]["420"]) == {"0.0", "1.0"}
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_text_report(ckpt_with_tokenizer, tmp_path, capsys):
    data = tmp_path / "excerpt.txt"
    data.write_text(kjv_excerpt(600))
    assert main(["--checkpoint", str(ckpt_with_tokenizer), "--data", str(data), "--seq-len", "64"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


@pytest.fixture(scope="module")
def refusal_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    (root / "empty.txt").write_text("  \n\n")
    (root / "short.txt").write_text("In the beginning God created the heaven and the earth.")
    (root / "text.txt").write_text(kjv_excerpt(2000))
    return root


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{root}/missing.txt"], "missing.txt: no such file"),
        (["--data", "{root}/empty.txt"], "empty.txt is empty"),
        (["--data", "{root}/short.txt", "--seq-len", "100"], "fewer than one window of seq_len=100"),
        (["--data", "{root}/text.txt", "--seq-len", "129"], "max_seq_len=128"),
        (["--data", "{root}/text.txt", "--seq-len", "32", "--stride", "33"], "stride=33 must be between 1 and"),
        (["--data", "{root}/text.txt", "--seq-len", "32", "--passkey", "--contexts", "512"],
         "context of 512 tokens plus its answer .* does not fit the model's max_seq_len=128"),
        (["--data", "{root}/text.txt", "--seq-len", "32", "--override", "max_seq_len=4096", "--passkey", "--contexts",
          "100"], "context of 100 tokens is too short"),
        (["--data", "{root}/text.txt", "--override", "no_such_field=1"], "no_such_field"),
        (["--data", "{root}/text.txt", "--heatmap", "x.png"], "--heatmap draws passkey results: add --passkey"),
    ],
)
def test_cli_refusals(ckpt_with_tokenizer, refusal_files, args, message, capsys):
    argv = ["--checkpoint", str(ckpt_with_tokenizer)] + [a.format(root=refusal_files) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_cli_refuses_a_checkpoint_without_a_tokenizer(converted, refusal_files, capsys):
    assert main(["--checkpoint", str(converted["untied"]), "--data", str(refusal_files / "text.txt")]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "(97 tokens) is not the byte-level one (260)" in err


def test_python_m_lin_llm_evaluate_runs_the_cli(converted, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "lin_llm.evaluate", "--checkpoint", str(converted["untied"]), "--data",
         str(tmp_path / "none.txt")], check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert run.returncode == 2 and "none.txt: no such file" in run.stderr and "Traceback" not in run.stderr
