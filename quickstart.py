"""The end-to-end demo on the embedded default (no network, a few seconds on 2 CPU cores).

1. build a tiny random LLaMA with Hugging Face transformers and save it as safetensors;
2. convert it with `python -m lin_llm.convert` and load it in JAX;
3. check our logits against transformers';
4. generate a few tokens with the jitted decoding loop, via decode.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

import decode
from lin_llm.checkpoint import load_checkpoint
from lin_llm.convert import main as convert_main
from lin_llm.hf_reference import hf_logits, save_tiny_hf_llama


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)

    hf_dir = save_tiny_hf_llama(work / "hf", tie=False, vocab_size=260, bos_token_id=256, eos_token_id=257)
    print(f"[1/4] built a tiny random LlamaForCausalLM with transformers at {hf_dir}")
    if convert_main(["--hf-dir", str(hf_dir), "--out", str(work / "converted")]) != 0:
        return 1
    print("[2/4] converted it to a lin_llm checkpoint")
    ids = np.random.RandomState(0).randint(0, 256, size=(1, 32))
    ours = np.asarray(load_checkpoint(work / "converted")(ids))
    diff = float(np.abs(ours - hf_logits(hf_dir, ids)).max())
    print(f"[3/4] max |logits(lin_llm) - logits(transformers)| = {diff:.2e}")
    if diff > 1e-4:
        print("error: the converted model does not match transformers", file=sys.stderr)
        return 1
    print("[4/4] greedy decoding (random weights, so expect gibberish):")
    return decode.main(["--checkpoint", str(work / "converted"), "--prompt", "In the beginning", "--max-new-tokens", "16"])


if __name__ == "__main__":
    sys.exit(main())
