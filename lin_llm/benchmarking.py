"""Decoding measurements shared by ``decode.py --benchmark`` and ``bench/decode.py``.

Every figure times a jitted call after a first call that compiled it; all are wall-clock on
whatever JAX's default device is, so compare ratios measured in the same run.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lin_llm.decoding import generate, medusa_generate, speculative_generate
from lin_llm.io.atomic import write_text

CONTEXTS = (256, 2048, 16384)


def write_result(result: dict, out_dir, name: str) -> Path:
    """Save a benchmark's result as OUT_DIR/NAME.json (creating OUT_DIR); returns OUT_DIR, where
    its table or plot goes too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    return out


def cached_result(path, compute) -> dict:
    """The JSON result at ``path``, or ``compute()`` saved there (atomically): a long benchmark
    rerun measures only what is missing."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=1))
    return result


def timed(fn, repeats: int = 3):
    """(median seconds, last result) of fn() after one warm-up call (which compiles)."""
    (seconds,), (result,) = interleaved([fn], repeats)
    return seconds, result


def interleaved(fns, rounds: int = 3):
    """([median seconds of each fn], [last result of each]) over `rounds` rounds that call every
    fn once in turn, after one warm-up call each: load that drifts during the run falls on all
    of them alike."""
    results = [jax.block_until_ready(fn()) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times], results


def memory_bandwidth(megabytes: int = 512, rounds: int = 5) -> float:
    """GB/s of a jitted sum over an fp32 array of `megabytes` MB: the rate at which this machine
    streams memory, the ceiling of a decode step that reads each weight once."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / timed(lambda: total(x), rounds)[0] / 1e9


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def bytes_read_per_step(model, context: int) -> int:
    """Bytes one decode step has to read with `context` slots of state: every parameter once (a
    tied embedding once, as the output head; an untied input embedding only one row, counted as
    none) and the whole decoding state (a KV cache is read to its allocated length, masked)."""
    total = _nbytes(nnx.state(model, nnx.Param))
    if not model.cfg.tie_embeddings:
        total -= _nbytes(model.embed.embedding)
    return total + _nbytes(jax.eval_shape(lambda: model.init_state(1, context)))


def matmul_gflops(repeats: int = 3, n: int = 2048) -> float:
    """GFLOP/s of a plain fp32 [n, n] @ [n, n] jnp matmul: the machine's reference throughput."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    return 2 * n**3 / timed(lambda: matmul(a), repeats)[0] / 1e9


@functools.partial(jax.jit, static_argnames=("n_steps",))
def _greedy_steps(model, state, token, n_steps):

    def body(_, carry):
        token, state = carry
        logits, state = model.step(token, state)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), state

    return jax.lax.fori_loop(0, n_steps, body, (token, state))[0]


@jax.jit
def _prefill_chunk(model, ids, state):
    return model.prefill(ids, state)[1]


def _context_state(model, context: int, n_steps: int, chunk: int, seed: int):
    needed = context + n_steps
    if needed > model.cfg.max_seq_len:
        raise ValueError(f"context {context} + {n_steps} steps exceeds max_seq_len={model.cfg.max_seq_len}")
    ids = jax.random.randint(jax.random.key(seed), (1, context), 0, model.cfg.vocab_size)
    state = model.init_state(1, needed)
    for start in range(0, context, chunk):  # a softmax model's [T, T] scores would not fit at once
        state = _prefill_chunk(model, ids[:, start : start + chunk], state)
    return lambda: _greedy_steps(model, state, ids[:, -1], n_steps)


def latency_at_contexts(model, contexts, n_steps: int = 128, rounds: int = 5, chunk: int = 512, seed: int = 0) -> dict:
    """Seconds per decoded token (B = 1) once each context length is in the state: {context: s}.

    Every context is prefilled first, then timed in interleaved rounds (median), so that warm-up,
    allocator and frequency effects fall on all lengths alike.
    """
    runs = {c: _context_state(model, c, n_steps, chunk, seed) for c in contexts}
    for run in runs.values():
        jax.block_until_ready(run())  # compile + warm up
    samples = {c: [] for c in contexts}
    for _ in range(rounds):
        for c, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            samples[c].append(time.perf_counter() - start)
    return {c: float(np.median(samples[c])) / n_steps for c in contexts}


def compare_decoding(target, prompt, max_new_tokens, *, draft=None, medusa_topk=None, gamma=4, repeats=3) -> dict:
    """Greedy plain vs speculative (with `draft`) or Medusa (with `medusa_topk`) decoding of one
    prompt: tokens/s of each, whether the outputs are identical, and the acceptance stats."""
    run_plain = lambda: generate(target, [prompt], max_new_tokens)
    result = {"max_new_tokens": max_new_tokens}
    if draft is not None:
        run = lambda: speculative_generate(target, draft, [prompt], max_new_tokens, gamma=gamma)
        name = "speculative"
    elif medusa_topk is not None:
        run = lambda: medusa_generate(target, [prompt], max_new_tokens, topk=tuple(medusa_topk))
        name = "medusa"
    else:
        seconds, _ = timed(run_plain, repeats)
        return {**result, "plain_tokens_per_s": round(max_new_tokens / seconds, 2)}
    (plain_seconds, seconds), (plain, (tokens, stats)) = interleaved([run_plain, run], repeats)
    result["plain_tokens_per_s"] = round(max_new_tokens / plain_seconds, 2)
    result.update({
        "mode": name,
        f"{name}_tokens_per_s": round(max_new_tokens / seconds, 2),
        "speedup": round(plain_seconds / seconds, 3),
        "identical_greedy_output": bool(np.array_equal(np.asarray(tokens), np.asarray(plain))),
        **{key: round(value, 4) if isinstance(value, float) else value for key, value in stats.items()},
    })
    if name == "speculative":
        result["gamma"] = gamma
        result["mean_accepted_length"] = round(stats["acceptance_rate"] * gamma, 4)
    return result
