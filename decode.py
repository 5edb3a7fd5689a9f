"""Generate text from a lin_llm checkpoint: see lin_llm/cli/decode.py."""

import sys

from lin_llm.cli.decode import main

if __name__ == "__main__":
    sys.exit(main())
