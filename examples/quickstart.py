"""Quick start: eval-mode batch norm with fastbn, checked against NumPy."""
import time

import numpy as np

import fastbn
from fastbn import functional as F

rng = np.random.default_rng(0)
x = rng.standard_normal((32, 64, 28, 28)).astype(np.float32)   # (N, C, H, W)
running_mean = rng.standard_normal(64).astype(np.float32)
running_var = rng.random(64).astype(np.float32) + 0.5
weight = rng.standard_normal(64).astype(np.float32)
bias = rng.standard_normal(64).astype(np.float32)

y = F.batch_norm(x, running_mean, running_var, weight, bias)          # fast C kernel
with fastbn.use_backend("reference"):
    y_ref = F.batch_norm(x, running_mean, running_var, weight, bias)  # pure NumPy

out = np.empty_like(x)
timings = {}
for name in ("fast", "reference"):
    with fastbn.use_backend(name):
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            F.batch_norm(x, running_mean, running_var, weight, bias, out=out)
            runs.append(time.perf_counter() - start)
    timings[name] = float(np.median(runs))

print(f"simd target {fastbn.get_simd_target()}, threads {fastbn.get_num_threads()}")
print(f"max |fast - reference| = {np.abs(y - y_ref).max():.2e}")
print(f"eval forward {x.shape} float32: fastbn {timings['fast'] * 1e3:.2f} ms, "
      f"NumPy reference {timings['reference'] * 1e3:.2f} ms, "
      f"speed-up {timings['reference'] / timings['fast']:.1f}x, "
      f"{2 * x.nbytes / timings['fast'] / 1e9:.1f} GB/s")
