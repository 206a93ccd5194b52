"""Two builds of fastbn's bfloat16 optimizers against each other on
ResNet-50's parameter list (fastbn.bench.cases.resnet50_shapes()), one worker
process per build, alternated round by round.

    python benchmarks/optim_ab_builds.py --a /path/to/base --b /path/to/new \\
        [--rounds 15] [--threads 1,2] [--variants adam,adam-bf16state,adam-bf16] [--reps 3]

--a and --b are folders that `import fastbn` finds the built package in.  A
round times --reps optimizer steps per (variant, thread count) in each
worker, each step after a 3 ms pause (idle OpenMP workers spin after a
parallel region).  Printed per row: min and median (ms) of A and B and
B / A of both.  The load average is printed before and after: on a shared
machine compare only the alternated columns of one row.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(variants, threads, reps):
    import numpy as np
    import fastbn
    from fastbn.bench.cases import resnet50_shapes
    from fastbn.optim._bf16 import bfloat16
    shapes = resnet50_shapes()
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal(s, dtype=np.float32) * 0.05) for s in shapes]
    grads = [(rng.standard_normal(s, dtype=np.float32) * 0.01) for s in shapes]
    bf = np.dtype(bfloat16())
    opts = {}
    for name in variants:
        kwargs = dict(lr=1e-3)
        dtype = np.float32
        if name in ("adam-bf16state", "adam-bf16", "adamw-bf16"):
            kwargs["state_dtype"] = "bfloat16"
        if name in ("adam-bf16", "adamw-bf16"):
            dtype = bf
        cls = fastbn.optim.AdamW if name.startswith("adamw") else fastbn.optim.Adam
        params = [fastbn.Parameter(d.astype(dtype), grad=g.astype(dtype)) for d, g in zip(data, grads)]
        opt = cls(params, **kwargs)
        opt.step()
        opts[name] = opt
    for line in sys.stdin:
        out = {}
        for nt in threads:
            fastbn.set_num_threads(nt)
            for name in variants:
                best = []
                for _ in range(reps):
                    time.sleep(0.003)
                    t0 = time.perf_counter()
                    opts[name].step()
                    best.append(time.perf_counter() - t0)
                out[f"{name} t{nt}"] = min(best)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--variants", default="adam,adam-bf16state,adam-bf16")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    variants = args.variants.split(",")
    if args.worker:
        worker(variants, threads, args.reps)
        return
    procs = {}
    for label, path in (("A", args.a), ("B", args.b)):
        env = dict(os.environ, PYTHONPATH=path)
        procs[label] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--a", "-", "--b", "-",
                                         "--threads", args.threads, "--variants", args.variants,
                                         "--reps", str(args.reps)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        cwd="/")
    print("load before:", os.getloadavg())
    results = {"A": {}, "B": {}}
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for label in order:
            p = procs[label]
            p.stdin.write("go\n")
            p.stdin.flush()
            for k, v in json.loads(p.stdout.readline()).items():
                results[label].setdefault(k, []).append(v * 1e3)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print("load after:", os.getloadavg())
    print(f"{'case':28s} {'A min':>8s} {'B min':>8s} {'B/A':>6s} {'A med':>8s} {'B med':>8s} {'B/A':>6s}")
    for k in results["A"]:
        a, b = results["A"][k], results["B"][k]
        print(f"{k:28s} {min(a):8.2f} {min(b):8.2f} {min(b) / min(a):6.3f} {statistics.median(a):8.2f} "
              f"{statistics.median(b):8.2f} {statistics.median(b) / statistics.median(a):6.3f}")


if __name__ == "__main__":
    main()
