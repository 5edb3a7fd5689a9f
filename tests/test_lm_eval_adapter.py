"""The lm-evaluation-harness adapter, offline: local YAML tasks over local JSONL data, run by
lm_eval itself on a tiny byte-level `aug` (linear attention) model, against the same numbers
computed here straight from the model's forward."""

import json

import jax
import numpy as np
import pytest

from lin_llm import build_model, load_checkpoint, load_config, save_model
from lin_llm.decoding import generate
from lin_llm.tokenizer import ByteTokenizer

MAX_LENGTH = 64  # model_args max_length: short enough that long documents need truncation / several windows
BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id

MC_DOCS = [
    {"question": "In the beginning God created", "choices": ["the heaven", "a cat", "nothing at all"], "label": 0},
    {"question": "And the earth was without", "choices": ["form", "void and dark"], "label": 1},
    {"question": "Let there be " + "light, and there was light; " * 4 + "and God saw the", "choices": ["light", "day"],
     "label": 0},  # longer than MAX_LENGTH: left-truncated
    {"question": "And God called the light", "choices": ["Day", "Night", "Evening", "Morning"], "label": 3},
]
ROLLING_DOCS = [{"text": "And the evening and the morning were the first day."},
                {"text": "And God said, Let the waters under the heaven be gathered together unto one place, and let "
                         "the dry land appear: and it was so. And God called the dry land Earth."}]  # several windows
GEN_DOCS = [{"question": "The sky is", "answer": " blue"}, {"question": "In the beginning", "answer": " God"},
            {"question": "Here we go. " * 6 + "There and", "answer": " back"}]

TASKS = {
    "lin_llm_tiny_mc": {"data": MC_DOCS, "output_type": "multiple_choice", "doc_to_text": "{{question}}",
                        "doc_to_choice": "choices", "doc_to_target": "label", "metric_list": [{"metric": "acc"}]},
    "lin_llm_tiny_rolling": {"data": ROLLING_DOCS, "output_type": "loglikelihood_rolling", "doc_to_text": "",
                             "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]},
    "lin_llm_tiny_gen": {"data": GEN_DOCS, "output_type": "generate_until", "doc_to_text": "{{question}}",
                         "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}],
                         "generation_kwargs": {"until": ["."], "max_gen_toks": 6, "do_sample": False}},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A byte-level 2-layer `aug` model whose conv and mixing scalars are non-zero."""
    cfg = load_config(None, [
        "model.vocab_size=260", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=64", "model.attention=aug", "model.la.group_size=16", "model.la.conv_kernel_size=7",
        "model.max_seq_len=128", "train.seq_len=128", "model.bos_id=256", "model.eos_id=257", "model.init_std=0.3",
    ]).model
    model = build_model(cfg, seed=7)
    for block in model.layers:
        for i, name in enumerate(block.attn.extra):
            param = getattr(block.attn, name)
            param[...] = param[...] + 0.3 * jax.random.normal(jax.random.key(i), param[...].shape)
    out = tmp_path_factory.mktemp("lm_eval") / "aug"
    save_model(model, out)
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("tasks")
    for name, spec in TASKS.items():
        spec = dict(spec)
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in spec.pop("data")))
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return root


@pytest.fixture(scope="module")
def evaluated(checkpoint, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lin_llm.lm_eval_adapter  # noqa: F401  registers "lin_llm"

    return lm_eval.simple_evaluate(
        model="lin_llm", model_args=f"checkpoint={checkpoint},max_length={MAX_LENGTH}", tasks=list(TASKS),
        batch_size=3, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), log_samples=True,
        bootstrap_iters=0,  # no stderr estimates: bootstrapping forks worker processes
    )


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint)


PAD_TO = 80  # every direct forward is padded to this length (causal: padding changes nothing before it)


@jax.jit
def _forward(model, ids):
    return model(ids)


def direct_logprobs(model, ids):
    """log p(ids[t + 1] | ids[: t + 1]) from the plain forward, in float64, and whether each
    token was the argmax."""
    from scipy.special import log_softmax

    padded = np.zeros((1, PAD_TO), np.int32)
    padded[0, : len(ids)] = ids
    logits = np.asarray(_forward(model, padded), np.float64)[0, : len(ids) - 1]
    targets = np.asarray(ids[1:])
    return log_softmax(logits, axis=-1)[np.arange(len(targets)), targets], logits.argmax(-1) == targets


def samples(evaluated, task):
    return sorted(evaluated["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihood_and_accuracy_equal_the_direct_computation(evaluated, model):
    correct = []
    for sample, doc in zip(samples(evaluated, "lin_llm_tiny_mc"), MC_DOCS):
        lls = []
        for (context, continuation), (ll, is_greedy) in zip(sample["arguments"], [r[0] for r in sample["resps"]]):
            ctx = [BOS] + list(context.encode())
            cont = list(continuation.encode())
            ids = (ctx + cont)[-(MAX_LENGTH + 1) :]
            logp, greedy = direct_logprobs(model, ids)
            assert float(ll) == pytest.approx(float(np.sum(logp[-len(cont) :])), abs=1e-4)
            assert bool(is_greedy) == bool(np.all(greedy[-len(cont) :]))
            lls.append(float(np.sum(logp[-len(cont) :])))
        correct.append(int(np.argmax(lls)) == doc["label"])
    assert len(MC_DOCS[2]["question"]) > MAX_LENGTH
    assert evaluated["results"]["lin_llm_tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def rolling_direct(model, tokens, prefix, length):
    """lm_eval's rolling protocol (its docstring): windows of `length` predictions, the first
    after the prefix token, each later one with a full `length`-token context."""
    total, start = 0.0, 0
    while start < len(tokens):
        end = min(start + length, len(tokens))
        inputs = [prefix] + tokens[: end - 1] if start == 0 else tokens[end - length - 1 : end - 1]
        logp, _ = direct_logprobs(model, inputs + [tokens[end - 1]])
        total += float(np.sum(logp[-(end - start) :]))
        start = end
    return total


def test_rolling_loglikelihood_equals_the_direct_computation(evaluated, model):
    for sample, doc in zip(samples(evaluated, "lin_llm_tiny_rolling"), ROLLING_DOCS):
        tokens = list(doc["text"].encode())
        expected = rolling_direct(model, tokens, BOS, MAX_LENGTH)
        assert float(sample["resps"][0][0]) == pytest.approx(expected, abs=1e-3)
    assert len(ROLLING_DOCS[1]["text"]) > 2 * MAX_LENGTH
    first = list(ROLLING_DOCS[0]["text"].encode())  # one window: the whole text after BOS
    assert rolling_direct(model, first, BOS, MAX_LENGTH) == pytest.approx(
        float(np.sum(direct_logprobs(model, [BOS] + first)[0])), abs=1e-6
    )


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(evaluated, model):
    prompts = [([BOS] + list(doc["question"].encode()))[-(MAX_LENGTH - 6) :] for doc in GEN_DOCS]
    rows = np.asarray(generate(model, prompts, 6, eos_id=EOS)).tolist()  # the adapter's batch shape: compiled once
    for sample, out in zip(samples(evaluated, "lin_llm_tiny_gen"), rows):
        text = ByteTokenizer().decode(out[: out.index(EOS)] if EOS in out else out)
        assert sample["resps"][0][0] == text.split(".")[0]


@pytest.mark.slow  # lm_eval's CLI indexes all of its built-in tasks first (~30 s)
def test_the_command_line_runs_lm_eval_with_the_model_registered(checkpoint, task_dir, tmp_path, capsys):
    from lin_llm.lm_eval_adapter import main

    main(["--model", "lin_llm", "--model_args", f"checkpoint={checkpoint},max_length={MAX_LENGTH}", "--tasks",
          "lin_llm_tiny_mc", "--include_path", str(task_dir), "--batch_size", "3", "--limit", "2"])
    out = capsys.readouterr().out
    assert "lin_llm_tiny_mc" in out and "acc" in out


def test_bucket_lengths():
    from lin_llm.lm_eval_adapter import bucket_length

    assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert bucket_length(100, 128) == 128 and bucket_length(129, 200) == 200
