"""Generate text from a lin_llm checkpoint or a Hugging Face LLaMA directory.

    python decode.py --checkpoint DIR --prompt "In the beginning" --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import sys

from lin_llm.checkpoint import CheckpointError, load_checkpoint
from lin_llm.config import ConfigError
from lin_llm.generation import generate
from lin_llm.tokenizer import load_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="lin_llm checkpoint or Hugging Face LLaMA directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="model config key=value, repeatable")
    args = parser.parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint, overrides=args.override)
        tokenizer = load_tokenizer(args.checkpoint, model.cfg.bos_id, model.cfg.eos_id)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}"
            )
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("the prompt is empty after tokenisation; give some text with --prompt")
        if model.cfg.bos_id is not None:
            prompt = [model.cfg.bos_id] + prompt
        tokens = generate(
            model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, eos_id=model.cfg.eos_id, seed=args.seed,
        )
    except (CheckpointError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(tokens[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
