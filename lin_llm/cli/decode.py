"""Generate text from a lin_llm checkpoint (or a Hugging Face LLaMA directory).

    python decode.py --checkpoint DIR --prompt "In the beginning" [--max-new-tokens 64]
        [--draft DIR --gamma 4 | --medusa --medusa-topk 4 2 2]
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--benchmark] [--json]

Prints the text as it is generated, then a stats line. --benchmark measures plain vs
speculative/Medusa decoding of the same prompt and the per-token latency at 256, 2048 and
16384 tokens of context (--json: one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from lin_llm import benchmarking
from lin_llm.cli.common import interruptible, run_command
from lin_llm.decoding.sampling import check_sampling
from lin_llm.decoding.text import IncrementalText, decode_tokens, encode_prompt
from lin_llm.io import load_checkpoint
from lin_llm.tokenizer import model_tokenizer


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="lin_llm checkpoint or Hugging Face LLaMA directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--draft", help="draft model checkpoint for speculative decoding")
    mode.add_argument("--medusa", action="store_true", help="Medusa decoding with the checkpoint's own heads")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per target call")
    parser.add_argument("--medusa-topk", type=int, nargs="+", default=[4, 2, 2], help="tree: top-k of each head")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="model config key=value, repeatable")
    parser.add_argument("--benchmark", action="store_true", help="measure instead of printing text")
    parser.add_argument("--json", action="store_true", help="with --benchmark: print one JSON object")
    return parser


def _load(args):
    overrides = list(args.override)
    if args.benchmark:  # room for the longest latency context
        overrides.append(f"max_seq_len={max(benchmarking.CONTEXTS) + 256}")
    target = load_checkpoint(args.checkpoint, overrides=overrides)
    check_sampling(args.temperature, args.top_k, args.top_p, target.cfg.vocab_size,
                   greedy_only="Medusa decoding (--medusa)" if args.medusa else None)
    draft = load_checkpoint(args.draft, overrides=overrides) if args.draft else None
    tokenizer = model_tokenizer(args.checkpoint, target.cfg)
    return target, draft, tokenizer, encode_prompt(tokenizer, args.prompt)


def _benchmark(args, target, draft, prompt) -> None:
    result = benchmarking.compare_decoding(
        target, prompt, args.max_new_tokens, draft=draft, medusa_topk=args.medusa_topk if args.medusa else None,
        gamma=args.gamma,
    )
    result["attention"] = target.cfg.attention_summary
    latency = benchmarking.latency_at_contexts(target, benchmarking.CONTEXTS)
    result["latency_ms_per_token"] = {str(c): round(1e3 * s, 4) for c, s in latency.items()}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


class _Terminal:
    """stdout for streamed text; remembers whether a line is open, so that a message starts on a new one."""

    def __init__(self):
        self.line_open = False

    def write(self, text: str) -> None:
        print(text, end="", flush=True)
        if text:
            self.line_open = not text.endswith("\n")

    def end_line(self) -> None:
        if self.line_open:
            print(flush=True)
            self.line_open = False


def _decode(args, terminal: _Terminal, stream_holder: list) -> None:
    target, draft, tokenizer, prompt = _load(args)
    if args.benchmark:
        interruptible(lambda: _benchmark(args, target, draft, prompt))
        return
    stream = IncrementalText(tokenizer, terminal.write)
    stream_holder.append(stream)
    terminal.write(args.prompt)
    start = time.perf_counter()
    _, stats = interruptible(lambda: jax.block_until_ready(decode_tokens(
        target, prompt, args.max_new_tokens, draft=draft, medusa_topk=args.medusa_topk if args.medusa else None,
        gamma=args.gamma, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        eos_id=target.cfg.eos_id, stream=stream,
    )))
    seconds = time.perf_counter() - start
    n = len(stream.tokens)
    details = "".join(f", {k} {v:.3g}" if isinstance(v, float) else f", {k} {v}" for k, v in stats.items())
    terminal.end_line()
    print(f"[{n} tokens in {seconds:.2f} s (with compilation): {n / seconds:.1f} tokens/s{details}]", file=sys.stderr)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    terminal, streams = _Terminal(), []

    def interrupted() -> str:
        return f"generation stopped after {len(streams[0].tokens)} tokens" if streams else "nothing was generated"

    return run_command(lambda: _decode(args, terminal, streams), interrupted=interrupted, before_message=terminal.end_line)


if __name__ == "__main__":
    sys.exit(main())
