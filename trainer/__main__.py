"""`python -m trainer fit|validate|test` (LightningCLI) and `evaluate` / `predict` (ours)."""

import sys
from importlib import import_module


def main(argv: list[str]) -> int:
    """Dispatch on the first word; the exit code of the command."""
    command = argv[0] if argv else ""
    if command in ("evaluate", "predict"):
        return import_module(f"trainer.evaluation.{command}").main(argv[1:])
    return import_module("trainer.cli").main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
