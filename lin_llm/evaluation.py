"""Evaluation: sliding-window perplexity and passkey retrieval, over the model's own forward.

Perplexity follows transformers' "Perplexity of fixed-length models" guide: windows of at most
``seq_len`` tokens start every ``stride`` tokens; each window scores only the tokens after the
previous window's end (never its own first token, which has no context), so every token is
scored at most once and, with stride < seq_len, with at least seq_len - stride tokens of context.

Passkey retrieval is the synthetic long-context recall test of Landmark Attention / LongLoRA:
a random 5-digit key hidden at a chosen depth of repeated filler text, then asked for; greedy
decoding; a trial is correct when the first number in the answer is exactly the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lin_llm.decoding import generate
from lin_llm.errors import EvaluationError


@jax.jit
def score_tokens(model, inputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(targets[:, t] | inputs[:, : t + 1]) [B, T] (fp32), and whether each target was the argmax.
    For a text, inputs = ids[:, :-1] and targets = ids[:, 1:]."""
    logits = model(inputs)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return target_logits - jax.nn.logsumexp(logits, axis=-1), greedy


# --------------------------------------------------------------------------- perplexity


@dataclasses.dataclass(frozen=True)
class Perplexity:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float
    tokens_per_s: float  # scored tokens per second of scoring (compilation excluded)
    compile_s: float


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window, as the guide's loop visits them."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def check_perplexity_request(model, n_tokens: int, seq_len: int, stride: int) -> None:
    """The refusals of sliding_window_perplexity, for callers that check before loading data."""
    if not 2 <= seq_len <= model.cfg.max_seq_len:
        raise EvaluationError(
            f"seq_len={seq_len} must be between 2 and the model's max_seq_len={model.cfg.max_seq_len}"
        )
    if not 1 <= stride <= seq_len:
        raise EvaluationError(f"stride={stride} must be between 1 and seq_len={seq_len}")
    if n_tokens < seq_len:
        raise EvaluationError(
            f"the text has {n_tokens} tokens, fewer than one window of seq_len={seq_len}: give more text or a "
            "smaller seq_len"
        )


def sliding_window_perplexity(
    model, token_ids, seq_len: int, stride: int | None = None, batch_size: int = 4, progress: bool = False
) -> Perplexity:
    """Perplexity of token_ids (one text, BOS included if the model expects it) by the
    sliding-window protocol. Windows go through one compiled [batch_size, seq_len - 1] scorer: a
    short last window and a short last batch are padded and masked out."""
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    stride = seq_len if stride is None else stride
    check_perplexity_request(model, len(ids), seq_len, stride)
    if batch_size < 1:
        raise EvaluationError(f"batch_size={batch_size} must be >= 1")
    windows = sliding_windows(len(ids), seq_len, stride)
    batch_size = min(batch_size, len(windows))
    start = time.perf_counter()
    shape = jax.ShapeDtypeStruct((batch_size, seq_len - 1), jnp.int32)
    scorer = score_tokens.lower(model, shape, shape).compile()
    compile_s = time.perf_counter() - start
    total = sum(end - first for _, end, first in windows)
    nll, count = 0.0, 0
    start = time.perf_counter()
    with tqdm(total=total, disable=not progress, desc="perplexity", unit="tok") as bar:
        for i in range(0, len(windows), batch_size):
            batch = np.zeros((batch_size, seq_len), np.int32)
            scored = np.zeros((batch_size, seq_len - 1), bool)  # column p: the window's token p + 1
            for row, (begin, end, first) in enumerate(windows[i : i + batch_size]):
                batch[row, : end - begin] = ids[begin:end]
                scored[row, first - begin - 1 : end - begin - 1] = True
            logprobs, _ = scorer(model, batch[:, :-1], batch[:, 1:])
            nll -= float(np.sum(np.asarray(logprobs, np.float64)[scored]))
            count += int(scored.sum())
            bar.update(int(scored.sum()))
    seconds = time.perf_counter() - start
    return Perplexity(
        tokens=count, nll=nll / count, perplexity=float(np.exp(nll / count)), tokens_per_s=count / seconds,
        compile_s=compile_s,
    )


# --------------------------------------------------------------------------- passkey retrieval

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_ANCHOR = "Go."  # pieces are tokenized as they would be after a sentence end


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: str
    needle: tuple[int, int]  # token span [start, end) of the sentence that holds the key
    answer_tokens: int  # new tokens to generate: the key's, plus two


def _continuation(tokenizer, text: str) -> list[int]:
    """The tokens of ``text`` where it follows a sentence in a longer text."""
    anchor = tokenizer.encode(_ANCHOR)
    ids = tokenizer.encode(_ANCHOR + text)
    if ids[: len(anchor)] != anchor:
        raise EvaluationError(
            f"the tokenizer does not split {text!r} from the sentence before it; passkey prompts need that"
        )
    return ids[len(anchor) :]


def passkey_prompt(tokenizer, context_len: int, depth: float, key: str) -> PasskeyPrompt:
    """The intro, as many filler sentences as fit in ``context_len`` tokens with the needle
    after round(depth * n) of them, and the question; at most context_len tokens in all."""
    if not 0.0 <= depth <= 1.0:
        raise EvaluationError(f"depth={depth} must be between 0 and 1")
    head = tokenizer.encode(PASSKEY_INTRO, add_special_tokens=True)
    filler = _continuation(tokenizer, PASSKEY_FILLER)
    needle = _continuation(tokenizer, PASSKEY_NEEDLE.format(key=key))
    question = _continuation(tokenizer, PASSKEY_QUESTION)
    fixed = len(head) + len(needle) + len(question)
    units = (context_len - fixed) // len(filler)
    if units < 1:
        raise EvaluationError(
            f"a passkey context of {context_len} tokens is too short: the prompt needs at least "
            f"{fixed + len(filler)} tokens with this tokenizer"
        )
    before = round(depth * units)
    start = len(head) + before * len(filler)
    ids = head + filler * before + needle + filler * (units - before) + question
    return PasskeyPrompt(ids, key, (start, start + len(needle)), len(_continuation(tokenizer, " " + key)) + 2)


def passkey_correct(answer: str, key: str) -> bool:
    """Exact match: the first run of digits in the answer is the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key


@dataclasses.dataclass(frozen=True)
class PasskeyPlan:
    contexts: tuple[int, ...]
    depths: tuple[float, ...]
    trials: int
    prompts: dict[int, list[PasskeyPrompt]]  # per context: depth-major, trials prompts per depth


def passkey_plan(
    model, tokenizer, contexts: Sequence[int], depths: Sequence[float] = PASSKEY_DEPTHS, trials: int = 2, seed: int = 0
) -> PasskeyPlan:
    """Every prompt of a passkey run, checked against the model before anything is decoded:
    trials per (context, depth), each with its own key drawn from (seed, context, depth index, trial)."""
    if trials < 1:
        raise EvaluationError(f"trials={trials} must be >= 1")
    if not contexts or not depths:
        raise EvaluationError("a passkey run needs at least one context length and one depth")
    prompts = {}
    for context in contexts:
        group = []
        for d, depth in enumerate(depths):
            for trial in range(trials):
                key = str(np.random.default_rng((seed, context, d, trial)).integers(10_000, 100_000))
                group.append(passkey_prompt(tokenizer, context, depth, key))
        longest = max(len(p.ids) + p.answer_tokens for p in group)
        if longest > model.cfg.max_seq_len:
            raise EvaluationError(
                f"a passkey context of {context} tokens plus its answer ({longest} tokens) does not fit the model's "
                f"max_seq_len={model.cfg.max_seq_len}: choose shorter contexts"
            )
        prompts[context] = group
    return PasskeyPlan(tuple(contexts), tuple(float(d) for d in depths), trials, prompts)


def passkey_trial(model, tokenizer, prompts: Sequence[PasskeyPrompt], batch_size: int = 8) -> list[bool]:
    """Greedy answers to each prompt, scored exactly. Prompts may differ in length; a short last
    batch is filled up with copies of its last prompt, so every batch has one shape."""
    batch_size = min(batch_size, len(prompts))
    new = max(p.answer_tokens for p in prompts)
    correct = []
    for i in range(0, len(prompts), batch_size):
        batch = list(prompts[i : i + batch_size])
        rows = [p.ids for p in batch] + [batch[-1].ids] * (batch_size - len(batch))
        out = np.asarray(generate(model, rows, new, eos_id=model.cfg.eos_id))
        correct += [passkey_correct(tokenizer.decode(row), p.key) for row, p in zip(out, batch)]
    return correct


def passkey_accuracy(
    model, tokenizer, plan: PasskeyPlan, batch_size: int = 8, progress: bool = False
) -> dict[int, dict[float, float]]:
    """{context length: {depth: fraction of the plan's trials answered exactly}}."""
    result = {}
    for context in tqdm(plan.contexts, disable=not progress, desc="passkey", unit="context"):
        hits = passkey_trial(model, tokenizer, plan.prompts[context], batch_size)
        grid = np.array(hits).reshape(len(plan.depths), plan.trials)
        result[context] = {depth: float(row.mean()) for depth, row in zip(plan.depths, grid)}
    return result


def plot_passkey_heatmap(accuracy: dict[int, dict[float, float]], path: str | Path) -> Path:
    """A PNG heat map of passkey accuracy (depth x context length), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = list(accuracy)
    depths = list(next(iter(accuracy.values())))
    grid = np.array([[accuracy[c][d] for c in contexts] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 * len(contexts) + 2, 0.6 * len(depths) + 1.5))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for (row, col), value in np.ndenumerate(grid):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center")
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title("passkey retrieval accuracy")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --------------------------------------------------------------------------- both


@dataclasses.dataclass(frozen=True)
class PasskeyRequest:
    contexts: Sequence[int] = (512, 1024, 2048)
    depths: Sequence[float] = PASSKEY_DEPTHS
    trials: int = 2
    seed: int = 0


def evaluate(model, tokenizer, text: str, *, seq_len: int | None = None, stride: int | None = None,
             max_tokens: int | None = None, batch_size: int = 4, passkey: PasskeyRequest | None = None,
             heatmap: str | Path | None = None, progress: bool = False) -> dict:
    """What ``python -m lin_llm.evaluate`` reports: the perplexity of ``text`` (its first max_tokens
    tokens, BOS as the tokenizer adds it; windows of seq_len, default the model's maximum) and, when
    asked, passkey accuracy per context (and by depth). Every request is checked before any scoring."""
    ids = tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
    seq_len = seq_len or model.cfg.max_seq_len
    stride = stride or seq_len
    check_perplexity_request(model, len(ids), seq_len, stride)
    plan = None if passkey is None else passkey_plan(model, tokenizer, passkey.contexts, passkey.depths,
                                                     passkey.trials, passkey.seed)
    ppl = sliding_window_perplexity(model, ids, seq_len, stride, batch_size, progress=progress)
    result = {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "tokens_per_s": ppl.tokens_per_s}
    if plan is not None:
        by_depth = passkey_accuracy(model, tokenizer, plan, batch_size, progress=progress)
        result["passkey"] = {str(c): sum(cells.values()) / len(cells) for c, cells in by_depth.items()}
        result["passkey_by_depth"] = {str(c): {str(d): a for d, a in cells.items()} for c, cells in by_depth.items()}
        if heatmap:
            plot_passkey_heatmap(by_depth, heatmap)
    return result
