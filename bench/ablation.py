"""The paper's ablation in miniature, on the embedded corpus.

Pretrain a tiny softmax LLaMA (configs/tiny.yaml), then linearise it with each attention and
fine-tune every one for the same number of steps (configs/tiny-aug.yaml with
model.attention=NAME): the paper's parts (local, global, local_global, local_conv, aug, and
global+conv), and three other families (elu, performer, hedgehog), each with and without
+conv. A softmax model fine-tuned for the same steps is the control. Writes a table of
validation perplexity (before and after fine-tuning) and a plot of the curves to --out.

    python bench/ablation.py                          # the full run (see --help for its size)
    python bench/ablation.py --pretrain-steps 30 --steps 10 --eval-every 5   # a smoke run

Stages that finished are reused and interrupted ones resume (--workdir keeps them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lin_llm import load_checkpoint, load_config
from lin_llm.benchmarking import write_result
from lin_llm.data import load_corpus, val_batches
from lin_llm.training import evaluate_model, perplexity, train

ROOT = Path(__file__).resolve().parent.parent
PAPER = ["local", "local_conv", "global", "global+conv", "local_global", "aug"]
FAMILIES = ["elu", "elu+conv", "performer", "performer+conv", "hedgehog", "hedgehog+conv"]


def run(args) -> dict:
    work = Path(args.workdir).absolute()
    common = [f"train.eval_every={args.eval_every}", f"train.save_every={args.steps}", "train.log_every=10"]
    pre_cfg = load_config(ROOT / "configs" / "tiny.yaml",
                          [f"train.output_dir={work / 'pretrain'}", f"train.steps={args.pretrain_steps}",
                           f"train.save_every={args.pretrain_steps}", f"train.eval_every={args.pretrain_steps}"])
    t0 = time.perf_counter()
    teacher = train(pre_cfg, resume=True, progress=args.progress)
    rows = [{"attention": "softmax (pretrained)", "val_ppl_before": None, "val_ppl": teacher.final_val_ppl,
             "curve": {}, "seconds": time.perf_counter() - t0}]
    names = ["softmax"] + args.attention
    for name in names:
        t1 = time.perf_counter()
        cfg = load_config(ROOT / "configs" / "tiny-aug.yaml", [
            f"model.attention={name}", f"train.init_from={work / 'pretrain' / 'model'}",
            f"train.output_dir={work / name.replace('+', '_plus_')}", f"train.steps={args.steps}",
            f"train.learning_rate={args.learning_rate}", *common])
        corpus, _ = load_corpus(cfg.train, cfg.model)
        batches = val_batches(corpus, cfg.train.batch_size, cfg.train.val_batches)
        before = evaluate_model(load_checkpoint(work / "pretrain" / "model", overrides=[f"attention={name}"]), batches)
        result = train(cfg, resume=True, progress=args.progress)
        rows.append({
            "attention": name if name != "softmax" else "softmax (fine-tuned, control)",
            "val_ppl_before": perplexity(before), "val_ppl": result.final_val_ppl,
            "curve": {0: perplexity(before), **{s: perplexity(v) for s, v in sorted(result.val.items())}},
            "seconds": time.perf_counter() - t1,
        })
        print(f"{name}: val ppl {perplexity(before):.3f} -> {result.final_val_ppl:.3f}", flush=True)
    return {"pretrain_steps": args.pretrain_steps, "steps": args.steps, "rows": rows,
            "seconds": time.perf_counter() - t0}


def table(result: dict) -> str:
    base = result["rows"][0]["val_ppl"]
    lines = [f"Tiny LLaMA (configs/tiny.yaml) pretrained {result['pretrain_steps']} steps with softmax, then each "
             f"attention fine-tuned {result['steps']} steps (configs/tiny-aug.yaml). Validation perplexity "
             "(bytes) on the held-out chapters.", "",
             "| attention | ppl linearised, before fine-tuning | ppl after fine-tuning | vs pretrained softmax |",
             "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        before = "-" if r["val_ppl_before"] is None else f"{r['val_ppl_before']:.3f}"
        lines.append(f"| {r['attention']} | {before} | {r['val_ppl']:.3f} | {100 * (r['val_ppl'] / base - 1):+.1f}% |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    base = result["rows"][0]["val_ppl"]
    ax.axhline(base, color="black", lw=1, ls="--", label=f"softmax, pretrained ({base:.2f})")
    pair = {"local_conv": "local", "aug": "local_global"}  # each attention and its +conv share a colour
    bases = []
    for r in result["rows"][1:]:
        name = r["attention"]
        base = pair.get(name, name.replace("+conv", ""))
        if base not in bases:
            bases.append(base)
        curve = {int(k): v for k, v in r["curve"].items()}
        steps = sorted(curve)
        conv = "conv" in name or name == "aug"
        ax.plot(steps, [curve[s] for s in steps], "-" if conv else ":", color=plt.cm.tab10(bases.index(base) % 10),
                marker="o" if conv else "s", ms=3, label=f"{name} ({r['val_ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("Linearising a tiny softmax LLaMA: fine-tuning curves (solid: with conv, dotted: without)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per attention")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--attention", nargs="+", default=PAPER + FAMILIES)
    parser.add_argument("--workdir", default="runs/ablation")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    result = run(args)
    out = write_result(result, args.out, "ablation")
    (out / "ablation.md").write_text(table(result) + "\n")
    plot(result, out / "ablation.png")
    print(table(result))
    print(f"total {result['seconds']:.0f} s; wrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
