"""Decoding benchmarks, measured side by side in one run; prints one JSON object (+ a PNG).

1. Plain jitted greedy decoding vs Hugging Face transformers' generate on the same weights
   (PyTorch CPU, same prompt and length; the outputs must be identical).
2. Per-token latency at 256 / 2048 / 16384 tokens of context: linear attention (`aug`) vs softmax.
3. With --target and --draft (e.g. the main job's trained models): speculative vs plain decoding
   of the same prompt; with --medusa, Medusa vs plain on --target.

    python bench/decode.py [--config configs/tiny.yaml] [--target DIR --draft DIR [--gamma 4 6 8]] [--medusa]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

import lin_llm
from lin_llm import benchmarking, load_checkpoint, save_model
from lin_llm.decoding import generate
from lin_llm.io.hf import export_to_hf


def versus_transformers(cfg, prompt, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    model = lin_llm.build_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "ours")
        export_to_hf(Path(tmp) / "ours", Path(tmp) / "hf")
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, **kwargs)

    # interleaved rounds (median of each): the shared machine's load drifts over a run
    seconds, (ours, hf_out) = benchmarking.interleaved(
        [lambda: generate(model, [prompt], new_tokens), theirs], repeats
    )
    ours_seconds, hf_seconds = seconds
    return {
        "params": sum(p.numel() for p in hf.parameters()),
        "new_tokens": new_tokens,
        "torch_threads": torch.get_num_threads(),
        "transformers_tokens_per_s": round(new_tokens / hf_seconds, 1),
        "transformers_ms_per_token": round(1e3 * hf_seconds / new_tokens, 3),
        "lin_llm_tokens_per_s": round(new_tokens / ours_seconds, 1),
        "lin_llm_ms_per_token": round(1e3 * ours_seconds / new_tokens, 3),
        "speedup": round(hf_seconds / ours_seconds, 2),
        "identical_greedy_output": bool(np.array_equal(hf_out[0, len(prompt) :].numpy(), np.asarray(ours[0]))),
    }


def latency_table(cfg, contexts) -> dict:
    table = {}
    for attention in tqdm(("aug", "softmax"), desc="latency vs context"):
        model_cfg = lin_llm.config.config_from_dict(
            {"model": lin_llm.config.config_to_dict(cfg)},
            [f"model.attention={attention}", f"model.max_seq_len={max(contexts) + 256}"],
        ).model
        model = lin_llm.build_model(model_cfg, seed=0)
        ms = {str(c): round(1e3 * s, 4) for c, s in benchmarking.latency_at_contexts(model, contexts).items()}
        ms["ratio_longest_to_shortest"] = round(ms[str(max(contexts))] / ms[str(min(contexts))], 3)
        table[attention] = ms
    return table


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for attention, style in (("aug", "o-"), ("softmax", "s--")):
        row = result["latency_ms_per_token"][attention]
        contexts = sorted(int(c) for c in row if c.isdigit())
        ax.plot(contexts, [row[str(c)] for c in contexts], style, label=attention)
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="ms per decoded token", title="decoding latency vs context")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(benchmarking.CONTEXTS))
    parser.add_argument("--target", help="trained target checkpoint (speculative / Medusa comparison)")
    parser.add_argument("--draft", help="trained draft checkpoint")
    parser.add_argument("--medusa", action="store_true", help="Medusa decoding with --target's heads")
    parser.add_argument("--gamma", type=int, nargs="+", default=[4, 6, 8], help="draft tokens per target call")
    parser.add_argument("--prompt", default="And God said, Let there be light: and there was light.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)

    cfg = lin_llm.load_config(args.config).model
    prompt = [cfg.bos_id] + list(args.prompt.encode()) if cfg.bos_id is not None else list(args.prompt.encode())
    result = {"benchmark": "decode", "config": args.config}
    result["vs_transformers"] = versus_transformers(cfg, prompt, args.new_tokens, args.repeats)
    result["latency_ms_per_token"] = latency_table(cfg, args.contexts)
    if args.target and (args.draft or args.medusa):
        target = load_checkpoint(args.target)
        draft = load_checkpoint(args.draft) if args.draft else None
        # each setting is timed beside its own plain run: the machine's load drifts between them
        settings = [{"draft": draft, "gamma": g} for g in args.gamma] if draft else [{"medusa_topk": (4, 2, 2)}]
        result["speculative"] = [
            {"target": args.target, "draft": args.draft,
             **benchmarking.compare_decoding(target, prompt, args.new_tokens, repeats=args.repeats, **setting)}
            for setting in tqdm(settings, desc="speculative vs plain")
        ]
    out = benchmarking.write_result(result, args.out, "decode")
    plot(result, out / "decode_latency.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
