"""The main job, end to end on the embedded corpus (no network; a few minutes on 2 CPU cores).

1. train a tiny softmax LLaMA on data/kjv.txt.xz            (configs/tiny.yaml)
2. linearise it with the paper's `aug` attention and measure it before any fine-tuning
3. fine-tune the linearised model                             (configs/tiny-aug.yaml)
4. report both validation perplexities (same held-out chapters, same batches)
5. generate text from the linearised model with lin_llm.generation.generate

Stages that already finished in --workdir are reused and interrupted ones resume (their
checkpoints are there); --fresh starts over. Writes WORKDIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lin_llm import load_config
from lin_llm.checkpoint import load_checkpoint
from lin_llm.config import ConfigError
from lin_llm.data import DataError, load_corpus, val_batches
from lin_llm.generation import generate
from lin_llm.sharding import MeshError
from lin_llm.tokenizer import ByteTokenizer
from lin_llm.training import TrainError, evaluate_model, perplexity, train

ROOT = Path(__file__).resolve().parent
PROMPT = "In the beginning God"


def _stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: configs/tiny.yaml's train.steps")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: configs/tiny-aug.yaml's train.steps")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--fresh", action="store_true", help="delete --workdir first")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.workdir).absolute()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    try:
        pre = [f"train.output_dir={work / 'softmax'}"]
        if args.pretrain_steps:
            pre.append(f"train.steps={args.pretrain_steps}")
        pre_cfg = load_config(ROOT / "configs" / "tiny.yaml", pre)
        _stage(f"1/5 pretraining a softmax LLaMA on {pre_cfg.train.data} ({pre_cfg.train.steps} steps)")
        softmax = train(pre_cfg, resume=True, progress=not args.no_progress)
        if softmax.interrupted:
            return 130

        fine = [f"train.init_from={work / 'softmax' / 'model'}", f"train.output_dir={work / 'aug'}"]
        if args.finetune_steps:
            fine.append(f"train.steps={args.finetune_steps}")
        fine_cfg = load_config(ROOT / "configs" / "tiny-aug.yaml", fine)
        _stage("2/5 linearising it with `aug` (softmax weights + zero conv, lambda=1, alpha=0)")
        corpus, _ = load_corpus(fine_cfg.train, fine_cfg.model)
        batches = val_batches(corpus, fine_cfg.train.batch_size // fine_cfg.train.grad_accum, fine_cfg.train.val_batches)
        zero_shot = evaluate_model(load_checkpoint(work / "softmax" / "model", overrides=["attention=aug"]), batches)
        print(f"linearised, before fine-tuning: val loss {zero_shot:.4f}, ppl {perplexity(zero_shot):.3f}")

        _stage(f"3/5 fine-tuning the linearised model ({fine_cfg.train.steps} steps)")
        aug = train(fine_cfg, resume=True, progress=not args.no_progress)
        if aug.interrupted:
            return 130
    except (ConfigError, DataError, MeshError, TrainError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    _stage("4/5 validation perplexity (the same held-out chapters for every model)")
    rows = [("softmax (teacher)", softmax.final_val_loss), ("aug, before fine-tuning", zero_shot),
            ("aug, fine-tuned", aug.final_val_loss)]
    for name, loss in rows:
        print(f"  {name:<26} loss {loss:.4f}   ppl {perplexity(loss):8.3f}")
    gap = perplexity(aug.final_val_loss) / perplexity(softmax.final_val_loss) - 1
    print(f"  aug is {100 * gap:+.1f}% from the softmax model's perplexity (the goal: within 5%)")

    _stage(f"5/5 generating from the linearised model (prompt {PROMPT!r})")
    model = load_checkpoint(work / "aug" / "model")
    tok = ByteTokenizer()
    prompt = [[model.cfg.bos_id] + tok.encode(PROMPT)]
    texts = {}
    for name, temperature in (("greedy", 0.0), ("sampled, T=0.8 top-k 40", 0.8)):
        new = generate(model, prompt, args.max_new_tokens, temperature=temperature, top_k=40 if temperature else None,
                       eos_id=model.cfg.eos_id, seed=0)
        texts[name] = PROMPT + tok.decode(np.asarray(new[0]))
        print(f"--- {name}:\n{texts[name]}\n")

    report = {
        "softmax_val_loss": softmax.final_val_loss, "softmax_val_ppl": perplexity(softmax.final_val_loss),
        "aug_zero_shot_val_loss": zero_shot, "aug_zero_shot_val_ppl": perplexity(zero_shot),
        "aug_val_loss": aug.final_val_loss, "aug_val_ppl": perplexity(aug.final_val_loss),
        "aug_vs_softmax_ppl": perplexity(aug.final_val_loss) / perplexity(softmax.final_val_loss),
        "pretrain_tokens_per_s": softmax.tokens_per_s, "finetune_tokens_per_s": aug.tokens_per_s,
        "samples": texts, "seconds": time.perf_counter() - start,
    }
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {work / 'report.json'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
