"""Train (or fine-tune, or linearise and fine-tune) a lin_llm model, sharded over all devices.

    python train.py [--config configs/tiny.yaml] [--resume] [section.field=value ...]

Examples:
    python train.py                                            # tiny softmax LLaMA on data/kjv.txt.xz
    python train.py --config configs/tiny-aug.yaml train.init_from=runs/tiny/model
    python train.py mesh.data=2 mesh.fsdp=2 mesh.tensor=2      # on 8 devices
    python train.py --resume                                   # continue train.output_dir's latest checkpoint

Multi-host: every process runs the same command; jax.distributed.initialize() is called when
mesh.coordinator (or --coordinator, or JAX_COORDINATOR_ADDRESS) is set, or with
LIN_LLM_DISTRIBUTED=1 on a TPU pod / SLURM where JAX finds the rest itself.
Checkpoints, metrics.jsonl and the final model (output_dir/model) go to train.output_dir.
Ctrl-C saves a checkpoint and exits (status 130), SIGTERM likewise (status 143); --resume
continues from it, or from the newest intact checkpoint when the latest is damaged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/tiny.yaml"  # found from any working directory
REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--config", default=None, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--coordinator", help="multi-host: host:port of process 0 (= mesh.coordinator)")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes (= mesh.num_processes)")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index (= mesh.process_id)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=50 model.attention=aug")
    args = parser.parse_intermixed_args(argv)

    # after parsing, so that --help answers without importing JAX
    from lin_llm.cli.common import run_command
    from lin_llm.config import load_config
    from lin_llm.training import train

    overrides = list(args.overrides)
    for flag, key in (("coordinator", "coordinator"), ("num_processes", "num_processes"), ("process_id", "process_id")):
        if getattr(args, flag) is not None:
            overrides.append(f"mesh.{key}={getattr(args, flag)}")
    loaded = []

    def body() -> int:
        config = args.config
        if config is None:
            config = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else REPO_ROOT / DEFAULT_CONFIG
        loaded.append(load_config(config, overrides))
        result = train(loaded[0], resume=args.resume, progress=not args.no_progress)
        return 128 + result.stop_signal if result.interrupted else 0

    def interrupted() -> str:  # outside the loop (loading, distilling, exporting) or a second signal in it
        kept = f"; complete checkpoints in {Path(loaded[0].train.output_dir) / 'checkpoints'} are kept (--resume)"
        return "nothing new was saved" + (kept if loaded else "")

    return run_command(body, interrupted=interrupted)

if __name__ == "__main__":
    sys.exit(main())
