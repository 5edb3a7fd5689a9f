"""The main job, end to end on the embedded corpus (no network; about 10 minutes on 2 CPU cores).

1. pretrain a small softmax LLaMA target on data/kjv.txt.xz   (configs/small.yaml)
2. linearise it with the paper's `aug` attention and measure it before any fine-tuning
3. fine-tune the linearised target                             (configs/small-aug.yaml)
4. train a 2-layer `aug` draft from scratch                     (configs/draft.yaml)
5. report the validation perplexities (same held-out chapters, same batches)
6. decode with the linearised target: plain vs speculative with the draft (greedy, timed side by
   side, identical output), then a sampled continuation, speculatively

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

from lin_llm import load_checkpoint, load_config
from lin_llm.benchmarking import compare_decoding
from lin_llm.data import load_corpus, val_batches
from lin_llm.decoding import speculative_generate
from lin_llm.errors import LinLLMError
from lin_llm.tokenizer import ByteTokenizer
from lin_llm.training import evaluate_model, perplexity, train

ROOT = Path(__file__).resolve().parent
PROMPT = "In the beginning God"


def _stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _config(name: str, work: Path, output: str, steps: int | None, extra=()):
    overrides = [f"train.output_dir={work / output}", *extra]
    if steps:
        overrides.append(f"train.steps={steps}")
    return load_config(ROOT / "configs" / name, overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: configs/small.yaml's train.steps")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: configs/small-aug.yaml's train.steps")
    parser.add_argument("--draft-steps", type=int, default=None, help="default: configs/draft.yaml's train.steps")
    parser.add_argument("--gamma", type=int, default=6, help="draft tokens per target call")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--fresh", action="store_true", help="delete --workdir first")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.workdir).absolute()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    progress = not args.no_progress
    try:
        pre_cfg = _config("small.yaml", work, "softmax", args.pretrain_steps)
        fine_cfg = _config("small-aug.yaml", work, "aug", args.finetune_steps,
                           [f"train.init_from={work / 'softmax' / 'model'}"])
        draft_cfg = _config("draft.yaml", work, "draft", args.draft_steps)
        _stage(f"1/6 pretraining a softmax LLaMA target on {pre_cfg.train.data} ({pre_cfg.train.steps} steps)")
        softmax = train(pre_cfg, resume=True, progress=progress)
        if softmax.interrupted:
            return 128 + softmax.stop_signal

        _stage("2/6 linearising it with `aug` (softmax weights + zero conv, lambda=1, alpha=0)")
        corpus, _ = load_corpus(fine_cfg.train, fine_cfg.model)
        batches = val_batches(corpus, fine_cfg.train.batch_size // fine_cfg.train.grad_accum, fine_cfg.train.val_batches)
        zero_shot = evaluate_model(load_checkpoint(work / "softmax" / "model", overrides=["attention=aug"]), batches)
        print(f"linearised, before fine-tuning: val loss {zero_shot:.4f}, ppl {perplexity(zero_shot):.3f}")

        _stage(f"3/6 fine-tuning the linearised target ({fine_cfg.train.steps} steps)")
        aug = train(fine_cfg, resume=True, progress=progress)
        if aug.interrupted:
            return 128 + aug.stop_signal

        _stage(f"4/6 training a 2-layer `aug` draft from scratch ({draft_cfg.train.steps} steps)")
        draft_run = train(draft_cfg, resume=True, progress=progress)
        if draft_run.interrupted:
            return 128 + draft_run.stop_signal
    except LinLLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    _stage("5/6 validation perplexity (the same held-out chapters for every model)")
    rows = [("softmax target", softmax.final_val_loss), ("aug, before fine-tuning", zero_shot),
            ("aug, fine-tuned", aug.final_val_loss), ("draft (2-layer aug)", draft_run.final_val_loss)]
    for name, loss in rows:
        print(f"  {name:<26} loss {loss:.4f}   ppl {perplexity(loss):8.3f}")
    gap = perplexity(aug.final_val_loss) / perplexity(softmax.final_val_loss) - 1
    print(f"  aug is {100 * gap:+.1f}% from the softmax model's perplexity (the goal: within 5%)")

    _stage(f"6/6 decoding with the linearised target (prompt {PROMPT!r}, {args.max_new_tokens} new tokens)")
    target, draft = load_checkpoint(work / "aug" / "model"), load_checkpoint(work / "draft" / "model")
    tok = ByteTokenizer()
    prompt = [target.cfg.bos_id] + tok.encode(PROMPT)
    speed = compare_decoding(target, prompt, args.max_new_tokens, draft=draft, gamma=args.gamma)
    print(f"greedy: plain {speed['plain_tokens_per_s']:.0f} tokens/s, speculative {speed['speculative_tokens_per_s']:.0f} "
          f"tokens/s ({speed['speedup']:.2f}x, gamma={args.gamma}, {speed['mean_tokens_per_target_call']:.2f} tokens "
          f"per target call), identical output: {speed['identical_greedy_output']}")
    texts = {}
    for name, temperature in (("greedy", 0.0), ("sampled, T=0.8 top-k 40", 0.8)):
        new, stats = speculative_generate(
            target, draft, [prompt], args.max_new_tokens, gamma=args.gamma, temperature=temperature,
            top_k=40 if temperature else None, eos_id=target.cfg.eos_id, seed=0,
        )
        texts[name] = PROMPT + tok.decode(np.asarray(new[0]))
        print(f"--- {name} (speculative, acceptance {stats['acceptance_rate']:.2f}):\n{texts[name]}\n")

    report = {
        "softmax_val_loss": softmax.final_val_loss, "softmax_val_ppl": perplexity(softmax.final_val_loss),
        "aug_zero_shot_val_loss": zero_shot, "aug_zero_shot_val_ppl": perplexity(zero_shot),
        "aug_val_loss": aug.final_val_loss, "aug_val_ppl": perplexity(aug.final_val_loss),
        "aug_vs_softmax_ppl": perplexity(aug.final_val_loss) / perplexity(softmax.final_val_loss),
        "draft_val_loss": draft_run.final_val_loss, "draft_val_ppl": perplexity(draft_run.final_val_loss),
        "pretrain_tokens_per_s": softmax.tokens_per_s, "finetune_tokens_per_s": aug.tokens_per_s,
        "greedy_decoding": speed, "samples": texts, "seconds": time.perf_counter() - start,
    }
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {work / 'report.json'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
