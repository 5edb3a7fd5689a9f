"""Training throughput and model FLOP utilisation of the tiny config, softmax vs `aug`.

For each attention and sequence length T (batch of one sequence, so tokens/step = T), times
the whole jitted train step of lin_llm.training (forward, backward, clipping, AdamW) on the
current devices. MFU = model FLOPs per second / the throughput of a plain jnp matmul measured
in the same run (on a shared CPU the absolute numbers move; the ratio much less). Model FLOPs
are counted analytically (6 x matmul params x tokens, plus attention: causal softmax
6 L H d T^2, aug 3 L H (2 G d + 4 d^2 + 2 K d) T); XLA's own count of the compiled step is
reported too. Prints one JSON object and writes it (and a markdown table) to --out.

    python bench/train_throughput.py [--lengths 512 1024 2048 4096 8192] [--repeats 3] [--remat-from 8192]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
from tqdm import tqdm

from lin_llm import load_config
from lin_llm.benchmarking import matmul_gflops, timed, write_result
from lin_llm.training import Trainer

ROOT = Path(__file__).resolve().parent.parent


def model_flops(cfg, t: int) -> float:
    """Analytic training FLOPs of one sequence of t tokens."""
    m = cfg.model
    d, hd, h, kv, layers = m.dim, m.resolved_head_dim, m.n_heads, m.n_kv_heads, m.n_layers
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * m.ffn_dim  # q, o; k, v; gate, up, down
    matmul = 6 * (layers * per_layer + d * m.vocab_size) * t
    if m.attention == "softmax":
        attention = 6 * layers * h * hd * t * t  # causal: half of the 2 x 2 T^2 H d forward, x3 for training
    else:
        g, k_eff = m.la.group_size, (m.la.conv_kernel_size + 1) // 2
        attention = 3 * layers * h * (2 * g * hd + 4 * hd * hd + 2 * k_eff * hd) * t
    return float(matmul + attention)


def _xla_flops(trainer, batch) -> float | None:
    try:
        cost = trainer.train_step.lower(trainer.state, trainer.frozen, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:
        return None


def measure(attention: str, t: int, repeats: int, remat: bool, workdir: Path) -> dict:
    n = len(jax.devices())
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.attention={attention}", f"model.max_seq_len={max(t, 1024)}", f"train.seq_len={t}",
        f"train.batch_size={n}", "train.val_batches=1", "train.val_fraction=0.1", f"train.remat={str(remat).lower()}",
        f"train.output_dir={workdir / f'{attention}-{t}'}", "train.steps=1000",
    ])
    trainer = Trainer(cfg, progress=False)
    try:
        batch = trainer.train_batch(0)
        xla = _xla_flops(trainer, batch)

        def step():
            trainer.state, metrics = trainer.train_step(trainer.state, trainer.frozen, batch)
            return metrics["loss"]

        seconds, _ = timed(step, repeats)
    finally:
        trainer.close()
    tokens = n * t
    return {"attention": attention, "T": t, "batch": n, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "model_flops_per_step": model_flops(cfg, t) * n, "xla_flops_per_step": xla, "remat": remat}


def table(result: dict) -> str:
    lines = ["| attention | T | remat | tokens/s | step (s) | MFU vs matmul | XLA FLOPs / model FLOPs |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['attention']} | {r['T']} | - | - | - | - | {r['skipped']} |")
            continue
        ratio = f"{r['xla_flops_per_step'] / r['model_flops_per_step']:.2f}" if r.get("xla_flops_per_step") else "-"
        remat = "yes" if r["remat"] else "no"
        lines.append(f"| {r['attention']} | {r['T']} | {remat} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
                     f"{100 * r['mfu']:.1f}% | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--attention", nargs="+", default=["softmax", "aug"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", action="store_true", help="rematerialise blocks (less memory at long T)")
    parser.add_argument("--remat-from", type=int, default=8192,
                        help="rematerialise from this length on (softmax's T x T scores at 8192 need ~10 GB otherwise)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    before = matmul_gflops(args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(a, t) for t in args.lengths for a in args.attention]
        for attention, t in tqdm(cases, desc="train throughput", unit="case"):
            try:
                rows.append(measure(attention, t, args.repeats, args.remat or t >= args.remat_from, Path(tmp)))
            except Exception as err:  # e.g. out of memory for softmax's T x T scores
                rows.append({"attention": attention, "T": t, "skipped": f"{type(err).__name__}: {str(err)[:120]}"})
    after = matmul_gflops(args.repeats)
    peak = (before + after) / 2 * 1e9  # the machine is shared: the matmul is measured before and after
    for row in rows:
        if "step_s" in row:
            row["mfu"] = row["model_flops_per_step"] / row["step_s"] / peak
    result = {
        "benchmark": "train_throughput", "config": "configs/tiny.yaml", "devices": len(jax.devices()),
        "platform": jax.devices()[0].platform, "matmul_gflops": peak / 1e9,
        "matmul_gflops_before_after": [before, after], "rows": rows,
    }
    out = write_result(result, args.out, "train_throughput")
    (out / "train_throughput.md").write_text(table(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
