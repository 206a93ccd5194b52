"""Benchmarks behind ``python -m fastbn bench``: fastbn vs the NumPy reference
vs PyTorch (when installed), as median time, speed-up, GB/s and % of the
machine's measured copy bandwidth."""
from .cases import Case, all_cases, resnet50_shapes
from .measure import stream_bandwidth, time_callable, time_interleaved, time_per_call
from .runner import build_parser, main

__all__ = ["Case", "all_cases", "resnet50_shapes", "stream_bandwidth", "time_callable",
           "time_interleaved", "time_per_call", "build_parser", "main"]
