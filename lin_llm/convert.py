"""``python -m lin_llm.convert``: see lin_llm/cli/convert.py."""

import sys

from lin_llm.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
