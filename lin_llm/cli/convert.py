"""Convert checkpoints between Hugging Face LLaMA directories and lin_llm checkpoints.

    python -m lin_llm.convert --hf-dir HF_DIR --out OUR_DIR          # HF -> lin_llm (orbax)
    python -m lin_llm.convert --to-hf --checkpoint OUR_DIR --out HF_DIR
    python -m lin_llm.convert --gguf FILE.gguf --out OUR_DIR [--dtype bfloat16]   # see lin_llm.io.gguf

Everything is validated (architecture, tensor names, shapes) before anything is written, and the
output appears only once complete.
"""

from __future__ import annotations

import argparse
import sys

from lin_llm.cli.common import run_command
from lin_llm.io.gguf import convert_gguf_to_checkpoint
from lin_llm.io.hf import convert_hf_to_checkpoint, export_to_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lin_llm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", help="Hugging Face LLaMA directory to convert into a lin_llm checkpoint")
    parser.add_argument("--to-hf", action="store_true", help="convert --checkpoint into a Hugging Face directory")
    parser.add_argument("--checkpoint", help="lin_llm checkpoint directory (with --to-hf)")
    parser.add_argument("--gguf", help="GGUF LLaMA file (llama.cpp's format, quantized or not) to convert")
    parser.add_argument("--dtype", help="with --gguf: dtype of the weights written (float32, the default, or bfloat16)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    args = parser.parse_args(argv)
    if args.dtype and not args.gguf:
        parser.error("--dtype applies to --gguf only (the other conversions keep the weights' dtype)")
    if args.to_hf and (not args.checkpoint or args.hf_dir or args.gguf):
        parser.error("--to-hf takes --checkpoint DIR (a lin_llm checkpoint), not --hf-dir or --gguf")
    if not args.to_hf and args.gguf and (args.hf_dir or args.checkpoint):
        parser.error("--gguf FILE converts one GGUF file; give neither --hf-dir nor --checkpoint")
    if not args.to_hf and not args.gguf and (not args.hf_dir or args.checkpoint):
        parser.error("give --hf-dir DIR or --gguf FILE (or --to-hf --checkpoint DIR)")
    return run_command(lambda: _convert(args), interrupted=lambda: f"nothing was written to {args.out}")


def _convert(args) -> None:
    if args.to_hf:
        export_to_hf(args.checkpoint, args.out, args.overwrite)
        print(f"wrote Hugging Face model to {args.out}")
        return
    if args.gguf:
        cfg = convert_gguf_to_checkpoint(args.gguf, args.out, args.dtype or "float32", args.overwrite)
    else:
        cfg = convert_hf_to_checkpoint(args.hf_dir, args.out, args.overwrite)
    print(f"wrote lin_llm checkpoint to {args.out}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.param_dtype}")


if __name__ == "__main__":
    sys.exit(main())
