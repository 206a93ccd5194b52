"""``python -m fastbn demo``: BatchNorm, optimizers and learning-rate
schedules compared on one MLP (see :func:`run_demo`)."""
from .cli import build_parser, main, run_demo

__all__ = ["build_parser", "main", "run_demo"]
