"""Command line: ``python -m fastbn info|bench|demo`` (and the ``fastbn`` console script)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastbn", description="fastbn command line")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("info", help="show version, SIMD targets, OpenMP and threads")
    from .bench.runner import build_parser as build_bench_parser
    build_bench_parser(commands.add_parser(
        "bench", help="benchmark fastbn vs the NumPy reference vs PyTorch"))
    from .demo.cli import build_parser as build_demo_parser
    build_demo_parser(commands.add_parser(
        "demo", help="train an MLP with/without BatchNorm across optimizers and lr schedules"))
    args = parser.parse_args(argv)
    import fastbn
    if args.command in (None, "info"):
        fastbn.show_config()
        return 0
    if args.command == "bench":
        from .bench.runner import main as bench_main
        return bench_main(args)
    if args.command == "demo":
        from .demo.cli import main as demo_main
        return demo_main(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
