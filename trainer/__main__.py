"""`python -m trainer fit|validate|test` (LightningCLI) and `evaluate` / `predict` (ours)."""

import sys

command = sys.argv[1] if len(sys.argv) > 1 else ""
if command in ("evaluate", "predict"):
    from importlib import import_module

    raise SystemExit(import_module(f"trainer.{command}").main(sys.argv[2:]))

from trainer.cli import main  # noqa: E402

main()
