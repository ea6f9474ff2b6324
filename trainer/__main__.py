"""`python -m trainer fit|validate|test` (LightningCLI) and `evaluate` / `predict` (ours)."""

import sys
from importlib import import_module

command = sys.argv[1] if len(sys.argv) > 1 else ""
if command in ("evaluate", "predict"):
    raise SystemExit(import_module(f"trainer.evaluation.{command}").main(sys.argv[2:]))
raise SystemExit(import_module("trainer.cli").main())
