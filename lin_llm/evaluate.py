"""``python -m lin_llm.evaluate``: see lin_llm.cli.evaluate."""
import sys

from lin_llm.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
