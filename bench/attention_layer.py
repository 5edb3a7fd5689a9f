"""Forward+backward time of one attention layer: the paper's `aug` chunked form vs softmax.

B=1, H=8, head dim 64, fp32, T = 1024..16384. Throughput is the layer's model FLOPs (the
useful multiply-adds, counted analytically below; backward = 2x forward) divided by the
measured time, reported as a fraction of a plain jnp matmul's throughput measured in the same
run (the machine is shared and noisy, so only same-run ratios mean much). XLA's own count is
not used: it counts a grouped convolution as dense. Prints one JSON object; writes JSON + PNG.

    python bench/attention_layer.py [--lengths 1024 2048 ...] [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from lin_llm.attention import layer, presets, softmax
from lin_llm.attention.layer import layer_math
from lin_llm.benchmarking import matmul_gflops, timed, write_result

B, H, D = 1, 8, 64
SOFTMAX_MAX_T = 8192  # its [H, T, T] scores at 16384 need ~9 GB per copy: beyond this machine


def model_flops(name: str, t: int, group: int = 64, conv_taps: int = 32) -> float:
    """Forward+backward FLOPs (2 per multiply-add; backward = 2x forward) of one layer."""
    if name == "softmax":  # causal: half of q k^T and of p v
        forward = 2 * (t * t / 2) * D * 2
    else:  # aug: in-group scores and values, per-group k^T v, q S, the conv over v
        forward = 2 * t * (group * D + group * D + D * D + D * D + conv_taps * D)
    return 3 * forward * B * H


def _fwd_bwd(forward):
    def loss(q, k, v, params):
        return jnp.sum(forward(q, k, v, params))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def aug_layer(t: int):
    preset = presets.get("aug")
    lm = layer_math(preset, group_size=64, local_kernel="relu2", head_dim=D, eps=1e-6, max_len=t,
                    performer_features=64, seed=0, layer=0)
    params = {name: jnp.asarray(value) for name, value in presets.init_params(preset, H, D, 63, False).items()}
    positions = jnp.arange(t)[None]
    return _fwd_bwd(lambda q, k, v, p: layer.forward(lm, p, q, k, v, positions)), params


def softmax_layer(t: int):
    return _fwd_bwd(lambda q, k, v, p: softmax.causal_attention(q, k, v)), {}


def run(lengths, repeats):
    matmul = matmul_gflops(repeats)
    rows = []
    cases = [(name, t) for t in lengths for name in ("aug", "softmax")]
    for name, t in tqdm(cases, desc="attention layers", unit="case"):
        if name == "softmax" and t > SOFTMAX_MAX_T:
            rows.append({"attention": name, "T": t, "skipped": f"[H, T, T] scores do not fit in memory above T={SOFTMAX_MAX_T}"})
            continue
        fn, params = (aug_layer if name == "aug" else softmax_layer)(t)
        q, k, v = (jax.random.normal(key, (B, t, H, D), jnp.float32) for key in jax.random.split(jax.random.key(t), 3))
        args = (q, k, v, params)
        seconds = timed(lambda: fn(*args), repeats)[0]
        flops = model_flops(name, t)
        gflops = flops / seconds / 1e9
        rows.append({
            "attention": name, "T": t, "fwd_bwd_ms": round(seconds * 1e3, 2), "model_gflop": round(flops / 1e9, 3),
            "gflop_per_s": round(gflops, 2), "fraction_of_matmul": round(gflops / matmul, 3),
        })
    for name in ("aug", "softmax"):  # time ratio per doubling of T
        measured = [r for r in rows if r["attention"] == name and "fwd_bwd_ms" in r]
        for prev, cur in zip(measured, measured[1:]):
            cur["time_ratio_vs_half_T"] = round(cur["fwd_bwd_ms"] / prev["fwd_bwd_ms"], 2)
    return {"benchmark": "attention_layer_fwd_bwd", "B": B, "H": H, "head_dim": D, "dtype": "float32",
            "device": jax.devices()[0].device_kind, "matmul_gflop_per_s": round(matmul, 2), "rows": rows}


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_frac) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("aug", "o-"), ("softmax", "s--")):
        rows = [r for r in result["rows"] if r["attention"] == name and "fwd_bwd_ms" in r]
        ax_time.loglog([r["T"] for r in rows], [r["fwd_bwd_ms"] for r in rows], style, label=name, base=2)
        ax_frac.semilogx([r["T"] for r in rows], [r["fraction_of_matmul"] for r in rows], style, label=name, base=2)
    ax_time.set(xlabel="sequence length T", ylabel="forward+backward (ms)", title="one attention layer, B=1 H=8 d=64")
    ax_frac.axhline(0.3, color="grey", lw=0.8, ls=":")
    ax_frac.set(xlabel="sequence length T", ylabel="fraction of matmul GFLOP/s",
                title=f"matmul: {result['matmul_gflop_per_s']} GFLOP/s")
    for ax in (ax_time, ax_frac):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    result = run(args.lengths, args.repeats)
    out = write_result(result, args.out, "attention_layer")
    plot(result, out / "attention_layer.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
