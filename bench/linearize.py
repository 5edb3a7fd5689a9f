"""Linearising a real pretrained LLaMA (SmolLM2-135M-Instruct) with each attention preset: held-out
perplexity zero-shot, after attention transfer and after LoRA, and passkey retrieval, under one
token budget for every preset. Prints one JSON object; writes bench/results/linearize.{json,md,png}.

    python bench/linearize.py                                  # the README's table (hours on 2 CPU cores)
    python bench/linearize.py --presets aug --transfer-steps 10 --lora-steps 5 --max-tokens 2048  # a smoke run

Protocol: lin_llm.evaluate's sliding-window perplexity of the held-out chapters of the embedded
corpus (the chapters no stage trains on), first --max-tokens tokens in windows of 512; passkey
retrieval at 512, 1024 and 2048 tokens (5 depths x --trials). The softmax control is the teacher
fine-tuned with the same LoRA budget: the fine-tuning also adapts to the corpus.
Each model's results are kept in WORK/<name>/results.json: a rerun only measures what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lin_llm import pipeline
from lin_llm.benchmarking import cached_result, write_result

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("aug", "local_global", "hedgehog", "hedgehog+conv", "elu+conv", "lolcats")


def _recipe(args) -> pipeline.Recipe:
    return pipeline.Recipe(
        transfer_overrides=(f"train.distill_steps={args.transfer_steps}", *args.transfer_override),
        lora_overrides=(f"train.steps={args.lora_steps}", *args.lora_override),
    )


def _preset(args, name: str, teacher: Path, protocol: pipeline.Protocol, recipe: pipeline.Recipe) -> dict:
    work = args.work / name.replace("+", "_")
    zero_shot = cached_result(work / "zero_shot.json", lambda: pipeline.measure(teacher, protocol, [f"attention={name}"]))
    transfer_dir, lora_dir = pipeline.linearize(teacher, name, work, recipe)
    after_transfer = cached_result(work / "transfer.json", lambda: pipeline.measure(transfer_dir, protocol))
    after_lora = cached_result(work / "lora.json", lambda: pipeline.measure(lora_dir, protocol, passkey=True))
    transfer_cfg, lora_cfg = recipe.configs(teacher, name, work)
    return {"zero_shot_ppl": zero_shot["perplexity"], "transfer_ppl": after_transfer["perplexity"],
            "lora_ppl": after_lora["perplexity"], "passkey": after_lora["passkey"],
            "tokens": recipe.tokens(transfer_cfg, lora_cfg), "model": str(lora_dir)}


def _softmax_control(args, teacher: Path, protocol: pipeline.Protocol) -> dict:
    cfg = pipeline.stage_config("smollm2.yaml", [f"train.init_from={teacher}", f"train.steps={args.lora_steps}",
                                                 f"train.output_dir={args.work / 'softmax-lora'}", *args.lora_override])
    result = cached_result(args.work / "softmax-lora" / "results.json",
                     lambda: pipeline.measure(pipeline.trained(cfg), protocol, passkey=True))
    return {"lora_ppl": result["perplexity"], "passkey": result["passkey"]}


def table(result: dict) -> str:
    teacher = result["teacher"]["perplexity"]
    contexts = list(result["teacher"]["passkey"])
    head = "| attention | zero-shot | after transfer | after LoRA | vs teacher | " + " | ".join(
        f"passkey {c}" for c in contexts) + " |"
    lines = [head, "|" + " --- |" * (5 + len(contexts))]
    passkeys = lambda p: " | ".join(f"{p[c]:.2f}" for c in contexts)
    lines.append(f"| softmax teacher | {teacher:.2f} | - | - | - | {passkeys(result['teacher']['passkey'])} |")
    control = result["softmax_lora"]
    lines.append(f"| softmax + same LoRA (control) | - | - | {control['lora_ppl']:.2f} | "
                 f"{control['lora_ppl'] / teacher - 1:+.1%} | {passkeys(control['passkey'])} |")
    for name, row in result["presets"].items():
        lines.append(f"| {name} | {row['zero_shot_ppl']:,.1f} | {row['transfer_ppl']:.2f} | {row['lora_ppl']:.2f} | "
                     f"{row['lora_ppl'] / teacher - 1:+.1%} | {passkeys(row['passkey'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["presets"])
    fig, (ax_ppl, ax_key) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, stage in enumerate(("zero_shot_ppl", "transfer_ppl", "lora_ppl")):
        ax_ppl.bar([x + 0.27 * (i - 1) for x in range(len(names))], [result["presets"][n][stage] for n in names],
                   width=0.27, label=stage.replace("_ppl", "").replace("_", " "))
    ax_ppl.axhline(result["teacher"]["perplexity"], color="k", linestyle="--", label="softmax teacher")
    ax_ppl.set(yscale="log", ylabel="held-out perplexity", title="perplexity after each stage", xticks=range(len(names)))
    ax_ppl.set_xticklabels(names, rotation=20)
    ax_ppl.legend(fontsize=8)
    contexts = list(result["teacher"]["passkey"])
    rows = {"teacher": result["teacher"]["passkey"], **{n: r["passkey"] for n, r in result["presets"].items()}}
    for i, (name, accuracy) in enumerate(rows.items()):
        ax_key.bar([x + i / (len(rows) + 1) for x in range(len(contexts))], [accuracy[c] for c in contexts],
                   width=1 / (len(rows) + 1), label=name)
    ax_key.set(ylabel="passkey accuracy", title="passkey retrieval (after LoRA)", xticks=range(len(contexts)), ylim=(0, 1))
    ax_key.set_xticklabels([f"{c} tokens" for c in contexts])
    ax_key.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "linearize")
    parser.add_argument("--transfer-steps", type=int, default=150, help="attention-transfer steps (4 x 512 tokens)")
    parser.add_argument("--lora-steps", type=int, default=60, help="LoRA steps (4 x 512 tokens)")
    parser.add_argument("--transfer-override", action="append", default=[], help="extra stage-1 config key=value")
    parser.add_argument("--lora-override", action="append", default=[], help="extra stage-2 config key=value")
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored per model")
    parser.add_argument("--trials", type=int, default=2, help="passkey trials per context and depth")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    teacher, protocol = pipeline.smollm2_teacher(args.work, args.max_tokens, args.trials)
    recipe = _recipe(args)
    result = {
        "protocol": {"command": protocol.command("MODEL"), "seq_len": protocol.seq_len, "max_tokens": args.max_tokens,
                     "passkey_trials": args.trials},
        "recipe": {"transfer": [recipe.transfer, *recipe.transfer_overrides], "lora": [recipe.lora, *recipe.lora_overrides]},
        "teacher": cached_result(args.work / "teacher-results.json", lambda: pipeline.measure(teacher, protocol, passkey=True)),
        "softmax_lora": _softmax_control(args, teacher, protocol),
        "presets": {name: _preset(args, name, teacher, protocol, recipe) for name in args.presets},
    }
    out = write_result(result, args.out, "linearize")
    (out / "linearize.md").write_text(table(result))
    plot(result, out / "linearize.png")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
