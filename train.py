"""Train (or fine-tune, or linearise and fine-tune) a lin_llm model: see lin_llm/cli/train.py."""

import sys

from lin_llm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
