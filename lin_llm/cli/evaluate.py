"""Evaluate a checkpoint: sliding-window perplexity of a text file, and passkey retrieval.

    python -m lin_llm.evaluate --checkpoint DIR --data FILE [--override key=value ...]
        [--seq-len N] [--stride S] [--max-tokens M] [--batch-size B]
        [--passkey --contexts 512 1024 2048 --trials K --depths 0 0.5 1 --seed 0 --heatmap FILE.png]
        [--json]

The text file (compressed .gz/.xz/.bz2 too) is read as one text and tokenized with the
checkpoint's tokenizer (with the BOS its tokenizer adds); the first --max-tokens tokens are
scored in windows of --seq-len tokens (default: the model's max_seq_len) every --stride tokens
(default: --seq-len). --json prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lin_llm import evaluation
from lin_llm.cli.common import run_command
from lin_llm.errors import EvaluationError
from lin_llm.io import load_checkpoint
from lin_llm.tokenizer import model_tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lin_llm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="lin_llm checkpoint or Hugging Face LLaMA directory")
    parser.add_argument("--override", action="append", default=[], help="model config key=value, repeatable")
    parser.add_argument("--data", required=True, help="plain-text file (.txt, optionally .gz/.xz/.bz2) for perplexity")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    parser.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --seq-len)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first M tokens of the text")
    parser.add_argument("--batch-size", type=int, default=4, help="windows (or passkey prompts) per forward pass")
    parser.add_argument("--passkey", action="store_true", help="also run passkey retrieval")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048], help="passkey context lengths")
    parser.add_argument("--depths", type=float, nargs="+", default=list(evaluation.PASSKEY_DEPTHS),
                        help="passkey depths (0 = right after the intro, 1 = just before the question)")
    parser.add_argument("--trials", type=int, default=2, help="passkey trials per context and depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passkey keys")
    parser.add_argument("--heatmap", help="write a PNG heat map of passkey accuracy (context x depth) here")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def read_text(path: str) -> str:
    """The whole file as one text; refuses a missing, unreadable or empty one."""
    import fsspec

    if not Path(path).is_file():
        raise EvaluationError(f"--data {path}: no such file; give a plain-text file to score")
    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise EvaluationError(f"--data {path}: cannot be read as UTF-8 text ({err})") from None
    if not text.strip():
        raise EvaluationError(f"--data {path} is empty; give a file with text in it")
    return text


def _check_args(args) -> None:
    for flag, value in (("--max-tokens", args.max_tokens), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise EvaluationError(f"{flag}={value} must be >= 1")
    if args.heatmap and not args.passkey:
        raise EvaluationError("--heatmap draws passkey results: add --passkey")


def run(args) -> dict:
    """Everything is checked (data, model, tokenizer, windows, passkey prompts) before any scoring."""
    _check_args(args)
    text = read_text(args.data)
    model = load_checkpoint(args.checkpoint, overrides=args.override)
    tokenizer = model_tokenizer(args.checkpoint, model.cfg)
    passkey = evaluation.PasskeyRequest(args.contexts, args.depths, args.trials, args.seed) if args.passkey else None
    return evaluation.evaluate(model, tokenizer, text, seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
                               batch_size=args.batch_size, passkey=passkey, heatmap=args.heatmap, progress=True)


def _report(result: dict, args) -> str:
    lines = [
        f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
        + f"({result['tokens_per_s']:.1f} tokens/s, compilation excluded)"
    ]
    for context, accuracy in result.get("passkey", {}).items():
        cells = ", ".join(f"{float(d):.0%}: {a:.2f}" for d, a in result["passkey_by_depth"][context].items())
        lines.append(f"passkey @ {context} tokens: {accuracy:.2f} (by depth {cells})")
    if args.heatmap:
        lines.append(f"heat map: {args.heatmap}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    def body() -> None:
        result = run(args)
        print(json.dumps(result) if args.json else _report(result, args))

    return run_command(body, interrupted=lambda: "nothing was reported")
