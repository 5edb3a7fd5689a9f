"""Convert checkpoints between Hugging Face LLaMA directories and lin_llm checkpoints.

    python -m lin_llm.convert --hf-dir HF_DIR --out OUR_DIR          # HF -> lin_llm (orbax)
    python -m lin_llm.convert --hf-dir llama-2-7b-aug-linear --medusa-heads HEADS/medusa_lm_head.pt --out OUR_DIR
    python -m lin_llm.convert --to-hf --checkpoint OUR_DIR --out HF_DIR [--softmax-only]
    python -m lin_llm.convert --gguf FILE.gguf --out OUR_DIR [--dtype bfloat16]   # see lin_llm.io.gguf

--hf-dir reads plain Hugging Face LLaMAs (safetensors or PyTorch .bin) and the authors' released
linearized LLaMA-2 layout (lin_llm.io.released); --to-hf writes the layout that
lin_llm.io.hf.check_exportable decides, or refuses. Everything is validated (architecture, tensor
names, shapes) before anything is written, and the output appears only once complete.
"""

from __future__ import annotations

import argparse
import sys

from lin_llm.cli.common import run_command
from lin_llm.io.gguf import convert_gguf_to_checkpoint
from lin_llm.io.released import convert_model_dir, export_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lin_llm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", help="Hugging Face LLaMA directory to convert into a lin_llm checkpoint")
    parser.add_argument("--medusa-heads", help="with --hf-dir: the Medusa heads' medusa_lm_head.pt (each with its own "
                        "output projection) to add to the model")
    parser.add_argument("--to-hf", action="store_true", help="convert --checkpoint into a Hugging Face directory")
    parser.add_argument("--softmax-only", action="store_true", help="with --to-hf: export the LLaMA weights alone, "
                        "dropping linear-attention params and Medusa heads (said on stderr)")
    parser.add_argument("--checkpoint", help="lin_llm checkpoint directory (with --to-hf)")
    parser.add_argument("--gguf", help="GGUF LLaMA file (llama.cpp's format, quantized or not) to convert")
    parser.add_argument("--dtype", help="with --gguf: dtype of the weights written (float32, the default, or bfloat16)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    args = parser.parse_args(argv)
    if args.dtype and not args.gguf:
        parser.error("--dtype applies to --gguf only (the other conversions keep the weights' dtype)")
    if args.medusa_heads and not args.hf_dir:
        parser.error("--medusa-heads FILE adds Medusa heads to the model of --hf-dir DIR")
    if args.softmax_only and not args.to_hf:
        parser.error("--softmax-only applies to --to-hf only")
    if args.to_hf and (not args.checkpoint or args.hf_dir or args.gguf):
        parser.error("--to-hf takes --checkpoint DIR (a lin_llm checkpoint), not --hf-dir or --gguf")
    if not args.to_hf and args.gguf and (args.hf_dir or args.checkpoint):
        parser.error("--gguf FILE converts one GGUF file; give neither --hf-dir nor --checkpoint")
    if not args.to_hf and not args.gguf and (not args.hf_dir or args.checkpoint):
        parser.error("give --hf-dir DIR or --gguf FILE (or --to-hf --checkpoint DIR)")
    return run_command(lambda: _convert(args), interrupted=lambda: f"nothing was written to {args.out}")


def _convert(args) -> None:
    if args.to_hf:
        plan = export_checkpoint(args.checkpoint, args.out, args.overwrite, args.softmax_only)
        layout = "the authors' released layout" if plan.layout == "released" else "a plain Hugging Face LLaMA"
        print(f"wrote {layout} to {args.out}")
        if args.softmax_only:
            print(f"--softmax-only: exported the LLaMA weights alone; left out: {plan.dropped or 'nothing'}",
                  file=sys.stderr)
    elif args.gguf:
        cfg = convert_gguf_to_checkpoint(args.gguf, args.out, args.dtype or "float32", args.overwrite)
        print(f"wrote lin_llm checkpoint to {args.out}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.param_dtype}")
    else:
        cfg = convert_model_dir(args.hf_dir, args.out, args.overwrite, args.medusa_heads)
        heads = f", {cfg.medusa_heads} Medusa heads" if cfg.medusa_heads else ""
        print(f"wrote lin_llm checkpoint to {args.out}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.param_dtype}, "
              f"attention {cfg.attention}{heads}")

if __name__ == "__main__":
    sys.exit(main())
