"""Command-line entry points: argparse over the library, no logic a test could not call."""
