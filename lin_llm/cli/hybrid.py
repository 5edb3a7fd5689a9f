"""Choose the layers of a hybrid model that keep softmax attention; prints model.softmax_layers=[...].

    python -m lin_llm.hybrid --every K [--offset O] [--config CFG] [section.field=value ...]
    python -m lin_llm.hybrid --highest N --config CFG [section.field=value ...]
    python -m lin_llm.hybrid --highest N --from-run RUN_DIR

--every K takes every K-th of the config's model.n_layers layers (by default the K-th, 2K-th, ...
counted from one; --offset O starts at 0-based layer O). --highest N runs the config's attention
transfer (train.init_from: the softmax checkpoint, train.distill_steps, model.attention: the linear
preset) with every layer linear, prints each layer's final relative attention MSE, and keeps the N
layers it stays highest for; --from-run reads the losses a finished transfer run recorded
(RUN_DIR/distill.json) instead of running one. The last line is the override to pass to train.py or load_checkpoint.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lin_llm.hybrid", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--every", type=int, metavar="K", help="every K-th layer")
    rule.add_argument("--highest", type=int, metavar="N", help="the N layers of highest attention-transfer loss")
    parser.add_argument("--offset", type=int, help="with --every: the first layer (0-based; default K - 1)")
    parser.add_argument("--from-run", metavar="RUN_DIR", help="with --highest: a finished transfer run's recorded losses")
    parser.add_argument("--config", help="YAML config (the model, and for --highest the transfer to run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.distill_steps=200")
    args = parser.parse_intermixed_args(argv)
    if args.offset is not None and args.every is None:
        parser.error("--offset applies to --every only")
    if args.from_run and args.highest is None:
        parser.error("--from-run applies to --highest only")

    # after parsing, so that --help answers without importing JAX
    from lin_llm.cli.common import run_command
    from lin_llm.config import load_config
    from lin_llm.layer_choice import every_kth, highest_transfer_loss, recorded_transfer_losses, transfer_losses

    def body() -> None:
        if args.from_run:
            losses = recorded_transfer_losses(args.from_run)
            print(f"relative attention MSE recorded in {args.from_run}:")
        elif args.every is not None:
            layers = every_kth(load_config(args.config, args.overrides).model.n_layers, args.every, args.offset)
        else:
            cfg = load_config(args.config, args.overrides)
            losses = transfer_losses(cfg, progress=not args.no_progress)
            print(f"relative attention MSE after {cfg.train.distill_steps} steps of attention transfer:")
        if args.highest is not None:
            for layer, loss in losses.items():
                print(f"  layer {layer:3d}  {loss:.5f}")
            layers = highest_transfer_loss(losses, args.highest)
        print(f"model.softmax_layers=[{','.join(map(str, layers))}]")

    return run_command(body, interrupted=lambda: "no layers were chosen")

if __name__ == "__main__":
    sys.exit(main())
