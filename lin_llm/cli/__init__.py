"""Command-line entry points: argparse and printing only, over library functions.

Each ``main(argv) -> int`` returns 0, 2 for bad input (a ``LinLLMError``: its message, no
traceback) or 130 when interrupted (train.py: 143 on SIGTERM).
"""
