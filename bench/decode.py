"""Decoding benchmarks, measured side by side in one run; prints one JSON object (+ a PNG).

1. Memory bandwidth: a jitted sum over 512 MB, the ceiling of a step that reads each weight once.
2. Attention shapes: plain greedy decoding of ~3M-parameter models with MHA, GQA and MQA heads
   vs Hugging Face transformers' generate on the same weights (identical tokens required).
3. The real model (--real-model, a lin_llm checkpoint such as the converted SmolLM2-135M) with
   fp32 and bf16 weights: ms/token, bytes read per token and that rate's fraction of the
   bandwidth, and transformers' generate on the fp32 weights; batched decoding (B = 1, 4, 16
   prompts of different lengths) and prefill tokens/s; the linearised (`aug`) model's latency at
   256 and 8192 tokens of context.
4. Per-token latency at 256 / 2048 / 16384 tokens of context of the tiny config: `aug` vs softmax.
5. With --target and --draft (e.g. the main job's trained models): speculative vs plain decoding
   of the same prompt; with --medusa, Medusa vs plain on --target.

    python bench/decode.py [--real-model DIR] [--config configs/tiny.yaml] [--target DIR --draft DIR]
        [--device-only]   # no transformers comparison (GPU machines without torch)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import lin_llm
from lin_llm import benchmarking, load_checkpoint, save_model
from lin_llm.decoding import generate
from lin_llm.io.hf import export_to_hf
from lin_llm.tokenizer import load_tokenizer

# The shape: ~3.3M parameters, 4 query heads over 4 (MHA), 2 (GQA) or 1 (MQA) KV heads.
SHAPE_MODEL = {"vocab_size": 260, "dim": 256, "n_layers": 4, "n_heads": 4, "ffn_dim": 688, "max_seq_len": 1024}
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
BF16 = ["param_dtype=bfloat16", "compute_dtype=bfloat16"]
REAL_PROMPT = "The history of the Roman Empire begins with the founding of the city of Rome, which"


def _rounded(result: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def _hf_model(model):
    """transformers' LlamaForCausalLM (fp32, eval) with the same weights, via lin_llm's export."""
    import torch
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "ours")
        export_to_hf(Path(tmp) / "ours", Path(tmp) / "hf")
        return LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).eval()


def versus_transformers(model, prompt, new_tokens: int, rounds: int, hf=None) -> dict:
    """Greedy decoding of one prompt by lin_llm and by transformers' generate, timed in interleaved
    rounds; the tokens must be identical."""
    import torch

    hf = _hf_model(model) if hf is None else hf
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0)

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, **kwargs)

    (ours_s, hf_s), (ours, hf_out) = benchmarking.interleaved([lambda: generate(model, [prompt], new_tokens), theirs],
                                                              rounds)
    return _rounded({
        "params": sum(p.numel() for p in hf.parameters()),
        "new_tokens": new_tokens,
        "torch_threads": torch.get_num_threads(),
        "transformers_ms_per_token": 1e3 * hf_s / new_tokens,
        "lin_llm_ms_per_token": 1e3 * ours_s / new_tokens,
        "transformers_tokens_per_s": new_tokens / hf_s,
        "lin_llm_tokens_per_s": new_tokens / ours_s,
        "speedup": hf_s / ours_s,
        "identical_greedy_output": bool(np.array_equal(hf_out[0, len(prompt):].numpy(), np.asarray(ours[0]))),
    })


def attention_shapes(prompt, new_tokens: int, rounds: int, device_only: bool) -> dict:
    """Each head layout of the issue's ~3M-parameter model against transformers (or alone)."""
    result = {}
    for name, kv in tqdm(KV_HEADS.items(), desc="attention shapes"):
        cfg = lin_llm.config.model_config_from_dict({**SHAPE_MODEL, "n_kv_heads": kv})
        model = lin_llm.build_model(cfg, seed=0)
        if device_only:
            seconds = benchmarking.timed(lambda: generate(model, [prompt], new_tokens), rounds)[0]
            result[name] = {"lin_llm_ms_per_token": round(1e3 * seconds / new_tokens, 4)}
        else:
            result[name] = versus_transformers(model, prompt, new_tokens, rounds)
        result[name]["kv_heads"] = kv
    return result


def bandwidth_use(model, context: int, seconds_per_token: float, bandwidth: float) -> dict:
    """Bytes a step reads at `context` tokens (weights once + state) and that rate against the bandwidth."""
    nbytes = benchmarking.bytes_read_per_step(model, context)
    rate = nbytes / seconds_per_token / 1e9
    return {"bytes_per_token": nbytes, "gb_per_s": round(rate, 2), "fraction_of_bandwidth": round(rate / bandwidth, 3)}


def real_dtypes(path, prompt, new_tokens, rounds, bandwidth, device_only) -> dict:
    """fp32 and bf16 weights of the real model, decoded side by side (and fp32 against transformers)."""
    models = {"float32": load_checkpoint(path), "bfloat16": load_checkpoint(path, overrides=BF16)}
    runs = [lambda m=m: generate(m, [prompt], new_tokens) for m in models.values()]
    seconds, outputs = benchmarking.interleaved(runs, rounds)
    result = {}
    context = len(prompt) + new_tokens
    for (name, model), s, out in zip(models.items(), seconds, outputs):
        result[name] = {"ms_per_token": round(1e3 * s / new_tokens, 3), "tokens_per_s": round(new_tokens / s, 2),
                        **bandwidth_use(model, context, s / new_tokens, bandwidth),
                        "same_tokens_as_float32": bool(np.array_equal(np.asarray(out), np.asarray(outputs[0])))}
    result["bfloat16_vs_float32_speed"] = round(seconds[0] / seconds[1], 3)
    if not device_only:
        result["float32"]["vs_transformers"] = versus_transformers(models["float32"], prompt, new_tokens, rounds)
    return result


def ragged_prompts(prompt, batch: int) -> list[list[int]]:
    """`batch` prompts of different lengths: prompt cut to len, len - 3, len - 6, ... (>= 4 tokens)."""
    return [prompt[: max(4, len(prompt) - 3 * r)] for r in range(batch)]


def batched(model, prompt, new_tokens: int, batch_sizes, rounds: int) -> dict:
    """Decoding throughput (all rows' new tokens per second) at each batch size, interleaved."""
    runs = [lambda b=b: generate(model, ragged_prompts(prompt, b), new_tokens) for b in batch_sizes]
    seconds, _ = benchmarking.interleaved(runs, rounds)
    return {str(b): {"tokens_per_s": round(b * new_tokens / s, 1), "ms_per_step": round(1e3 * s / new_tokens, 3)}
            for b, s in zip(batch_sizes, seconds)}


def prefill_rate(model, lengths, rounds: int) -> dict:
    """Prefill tokens/s of one prompt of each length from an empty state: the state and the last
    position's logits (what generate needs to start), interleaved."""

    @jax.jit
    def prefill(model, ids):
        logits, state = model.prefill(ids, model.init_state(1, ids.shape[1]))
        return logits[:, -1], state

    ids = {t: jax.random.randint(jax.random.key(t), (1, t), 0, model.cfg.vocab_size) for t in lengths}
    seconds, _ = benchmarking.interleaved([lambda t=t: prefill(model, ids[t]) for t in lengths], rounds)
    return {str(t): round(t / s, 1) for t, s in zip(lengths, seconds)}


def linearized_latency(path, contexts, rounds: int) -> dict:
    """Per-token latency of the real model with `aug` attention (untrained mixing params) by context."""
    model = load_checkpoint(path, overrides=["attention=aug", f"max_seq_len={max(contexts) + 256}"])
    seconds = benchmarking.latency_at_contexts(model, contexts, rounds=rounds)
    ms = {str(c): round(1e3 * s, 3) for c, s in seconds.items()}
    ms["ratio_longest_to_shortest"] = round(ms[str(max(contexts))] / ms[str(min(contexts))], 3)
    return ms


def real_model(path, new_tokens, rounds, bandwidth, device_only, contexts) -> dict:
    reference = load_checkpoint(path)
    tokenizer = load_tokenizer(path, reference.cfg.bos_id, reference.cfg.eos_id)
    prompt = tokenizer.encode(REAL_PROMPT)
    result = {"path": str(path), "prompt_tokens": len(prompt), "new_tokens": new_tokens}
    result["weights"] = real_dtypes(path, prompt, new_tokens, rounds, bandwidth, device_only)
    result["batched_float32"] = batched(reference, prompt, new_tokens, (1, 4, 16), rounds)
    result["prefill_tokens_per_s_float32"] = prefill_rate(reference, (128, 512), rounds)
    result["linearized_aug_ms_per_token"] = linearized_latency(path, contexts, rounds)
    return result


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


def speculative(args, prompt) -> list:
    target = load_checkpoint(args.target)
    draft = load_checkpoint(args.draft) if args.draft else None
    # each setting is timed beside its own plain run: the machine's load drifts between them
    settings = [{"draft": draft, "gamma": g} for g in args.gamma] if draft else [{"medusa_topk": (4, 2, 2)}]
    return [
        {"target": args.target, "draft": args.draft,
         **benchmarking.compare_decoding(target, prompt, args.new_tokens, repeats=args.repeats, **setting)}
        for setting in tqdm(settings, desc="speculative vs plain")
    ]


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for attention, style in (("aug", "o-"), ("softmax", "s--")):
        row = result["latency_ms_per_token"][attention]
        contexts = sorted(int(c) for c in row if c.isdigit())
        ax.plot(contexts, [row[str(c)] for c in contexts], style, label=attention)
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="ms per decoded token",
           title="decoding latency vs context")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="the latency-vs-context model")
    parser.add_argument("--real-model", default="runs/quickstart/teacher", help="lin_llm checkpoint (skipped if absent)")
    parser.add_argument("--new-tokens", type=int, default=256, help="new tokens of the small models")
    parser.add_argument("--real-new-tokens", type=int, default=64)
    parser.add_argument("--real-contexts", type=int, nargs="+", default=[256, 8192], help="linearised real model")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(benchmarking.CONTEXTS))
    parser.add_argument("--target", help="trained target checkpoint (speculative / Medusa comparison)")
    parser.add_argument("--draft", help="trained draft checkpoint")
    parser.add_argument("--medusa", action="store_true", help="Medusa decoding with --target's heads")
    parser.add_argument("--gamma", type=int, nargs="+", default=[4, 6, 8], help="draft tokens per target call")
    parser.add_argument("--prompt", default="And God said, Let there be light: and there was light.")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per comparison")
    parser.add_argument("--device-only", action="store_true", help="skip the transformers comparisons")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)

    cfg = lin_llm.load_config(args.config).model
    prompt = ([cfg.bos_id] if cfg.bos_id is not None else []) + list(args.prompt.encode())
    result = {"benchmark": "decode", "backend": jax.default_backend(), "config": args.config}
    result["memory_bandwidth_gb_per_s"] = round(benchmarking.memory_bandwidth(), 2)
    result["attention_shapes"] = attention_shapes(prompt[:32], args.new_tokens, args.repeats, args.device_only)
    if Path(args.real_model).exists():
        result["real_model"] = real_model(args.real_model, args.real_new_tokens, args.repeats,
                                          result["memory_bandwidth_gb_per_s"], args.device_only, args.real_contexts)
    else:
        result["real_model"] = f"{args.real_model} not found: pass --real-model DIR (a lin_llm checkpoint)"
    result["latency_ms_per_token"] = latency_table(cfg, args.contexts)
    if args.target and (args.draft or args.medusa):
        result["speculative"] = speculative(args, prompt)
    result["memory_bandwidth_gb_per_s_at_end"] = round(benchmarking.memory_bandwidth(), 2)
    out = benchmarking.write_result(result, args.out, "decode")
    plot(result, out / "decode_latency.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
