"""Hybrid SmolLM2-135M: softmax attention kept in 0, 2, 5 or 10 of its 30 layers, the others
linearised, each linearised with one recipe (attention transfer over the linear layers, then LoRA).
The layers are chosen both ways lin_llm.layer_choice offers: every k-th layer, and the layers whose
attention-transfer loss stayed highest in the all-linear model's transfer. For each model:
held-out perplexity, passkey retrieval at 512/1024/2048 tokens, and greedy decoding ms/token at
256 and 8176 tokens of context (8176 + the 16 timed tokens = SmolLM2's 8192 positions).
Prints one JSON object; writes bench/results/hybrid-PRESET.{json,md,png} (PRESET: the linear layers'
preset, "+" written "_").

    python bench/hybrid.py                   # the README's first table: hedgehog+conv (~2.5 h on 2 CPU cores)
    python bench/hybrid.py --attention aug   # its second: the paper's augmentation
    python bench/hybrid.py --counts 2 --transfer-steps 4 --lora-steps 2 --max-tokens 1024  # a smoke run

Each model's results are kept in WORK/<name>/results.json (WORK: runs/hybrid-PRESET by default): a
rerun only measures what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lin_llm import layer_choice, pipeline
from lin_llm.benchmarking import cached_result, latency_at_contexts, write_result
from lin_llm.io.load import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS = 30


def every_k_layers(count: int) -> list[int]:
    """``count`` softmax layers spread evenly: every (30 // count)-th layer, the last one included."""
    layers = layer_choice.every_kth(N_LAYERS, N_LAYERS // count)
    if len(layers) != count:
        raise SystemExit(f"--counts: {count} does not divide the {N_LAYERS} layers evenly (every k-th gives {layers})")
    return layers


def _measure(args, model_dir: Path, protocol: pipeline.Protocol, work: Path) -> dict:
    def compute() -> dict:
        quality = pipeline.measure(model_dir, protocol, passkey=True)
        seconds = latency_at_contexts(load_checkpoint(model_dir), args.contexts, n_steps=args.decode_steps, rounds=3)
        return {"perplexity": quality["perplexity"], "passkey": quality["passkey"],
                "ms_per_token": {str(c): 1e3 * s for c, s in seconds.items()}}

    return cached_result(work / "results.json", compute)


def _hybrid(args, teacher: Path, protocol, recipe, name: str, layers: list[int]) -> dict:
    work = args.work / name
    extra = [f"model.softmax_layers=[{','.join(map(str, layers))}]"] if layers else []
    _, lora_dir = pipeline.linearize(teacher, args.attention, work, recipe, extra)
    return {"softmax_layers": layers, **_measure(args, lora_dir, protocol, work)}


def table(result: dict) -> str:
    contexts = [str(c) for c in result["protocol"]["passkey_contexts"]]
    decode = list(result["teacher"]["ms_per_token"])
    lines = ["| model | softmax layers | perplexity | " + " | ".join(f"passkey {c}" for c in contexts) + " | "
             + " | ".join(f"ms/token @ {c}" for c in decode) + " |",
             "|" + " --- |" * (3 + len(contexts) + len(decode))]
    for name, row in {"softmax teacher": result["teacher"], **result["hybrids"]}.items():
        layers = "all 30" if name == "softmax teacher" else (",".join(map(str, row["softmax_layers"])) or "none")
        lines.append(f"| {name} | {layers} | {row['perplexity']:.2f} | "
                     + " | ".join(f"{row['passkey'][c]:.2f}" for c in contexts) + " | "
                     + " | ".join(f"{row['ms_per_token'][c]:.1f}" for c in decode) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [str(c) for c in result["protocol"]["passkey_contexts"]]
    decode = list(result["teacher"]["ms_per_token"])
    fig, (ax_ppl, ax_key, ax_ms) = plt.subplots(1, 3, figsize=(15, 4.3))
    for rule, marker in (("every", "o"), ("highest", "s")):
        rows = [("linear-0", result["hybrids"]["linear-0"])] + [
            (n, r) for n, r in result["hybrids"].items() if n.startswith(rule)]
        counts = [len(r["softmax_layers"]) for _, r in rows]
        label = "every k-th layer" if rule == "every" else "highest transfer loss"
        ax_ppl.plot(counts, [r["perplexity"] for _, r in rows], marker=marker, label=label)
        ax_key.plot(counts, [sum(r["passkey"][c] for c in contexts) / len(contexts) for _, r in rows], marker=marker,
                    label=label)
        ax_ms.plot(counts, [r["ms_per_token"][decode[-1]] for _, r in rows], marker=marker, label=f"{label}, {decode[-1]}")
        ax_ms.plot(counts, [r["ms_per_token"][decode[0]] for _, r in rows], marker=marker, linestyle=":",
                   label=f"{label}, {decode[0]}")
    teacher = result["teacher"]
    ax_ppl.axhline(teacher["perplexity"], color="k", linestyle="--", label="softmax teacher (30 layers)")
    ax_key.axhline(sum(teacher["passkey"][c] for c in contexts) / len(contexts), color="k", linestyle="--",
                   label="softmax teacher")
    for c, style in ((decode[-1], "--"), (decode[0], ":")):
        ax_ms.axhline(teacher["ms_per_token"][c], color="k", linestyle=style, label=f"softmax teacher, {c}")
    ax_ppl.set(xlabel="softmax layers (of 30)", ylabel="held-out perplexity", yscale="log", title="perplexity")
    ax_key.set(xlabel="softmax layers (of 30)", ylabel="passkey accuracy (mean over contexts)", ylim=(0, 1),
               title="passkey retrieval")
    ax_ms.set(xlabel="softmax layers (of 30)", ylabel="ms per decoded token", title="decoding latency by context")
    for ax in (ax_ppl, ax_key, ax_ms):
        ax.legend(fontsize=7)
    fig.suptitle(f"hybrid SmolLM2-135M, linear layers {result['recipe']['attention']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", default="hedgehog+conv",
                        help="the linear layers' preset (default: the best of bench/linearize.py)")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 5, 10], help="softmax layers kept (of 30)")
    parser.add_argument("--rules", nargs="+", choices=("every", "highest"), default=["every", "highest"],
                        help="how the softmax layers are chosen: every k-th layer, the highest transfer loss")
    parser.add_argument("--work", type=Path, help="where the models are trained (default runs/hybrid-PRESET)")
    parser.add_argument("--transfer-steps", type=int, default=30, help="attention-transfer steps (4 x 512 tokens)")
    parser.add_argument("--lora-steps", type=int, default=8, help="LoRA steps (4 x 512 tokens)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens scored per model")
    parser.add_argument("--trials", type=int, default=1, help="passkey trials per context and depth (5 depths)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 8176], help="decoding contexts")
    parser.add_argument("--decode-steps", type=int, default=16, help="tokens timed per decoding measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    table_name = "hybrid-" + args.attention.replace("+", "_")
    args.work = args.work or ROOT / "runs" / table_name

    teacher, protocol = pipeline.smollm2_teacher(args.work, args.max_tokens, args.trials)
    # one validation batch per stage: the held-out measurement below is what the table reports
    recipe = pipeline.Recipe(transfer_overrides=(f"train.distill_steps={args.transfer_steps}", "train.val_batches=1"),
                             lora_overrides=(f"train.steps={args.lora_steps}", "train.val_batches=1"))
    hybrids = {"linear-0": _hybrid(args, teacher, protocol, recipe, "linear-0", [])}
    losses = layer_choice.recorded_transfer_losses(args.work / "linear-0" / "transfer")
    choose = {"every": lambda count: every_k_layers(count),
              "highest": lambda count: layer_choice.highest_transfer_loss(losses, count)}
    for count in args.counts:
        for rule in args.rules:
            name = f"{rule}-{count}"
            hybrids[name] = _hybrid(args, teacher, protocol, recipe, name, choose[rule](count))
    result = {
        "protocol": {"command": protocol.command("MODEL"), "max_tokens": args.max_tokens, "passkey_contexts": [512, 1024, 2048],
                     "passkey_trials": args.trials, "decode_contexts": args.contexts, "decode_steps": args.decode_steps},
        "recipe": {"attention": args.attention, "transfer": [recipe.transfer, *recipe.transfer_overrides],
                   "lora": [recipe.lora, *recipe.lora_overrides]},
        "transfer_losses": {str(k): v for k, v in losses.items()},
        "teacher": _measure(args, teacher, protocol, args.work / "teacher-results"),
        "hybrids": hybrids,
    }
    out = write_result(result, args.out, table_name)
    (out / f"{table_name}.md").write_text(table(result))
    plot(result, out / f"{table_name}.png")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
