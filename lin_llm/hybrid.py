"""``python -m lin_llm.hybrid``: see lin_llm/cli/hybrid.py (the functions are in lin_llm.layer_choice)."""

import sys

from lin_llm.cli.hybrid import main

if __name__ == "__main__":
    sys.exit(main())
