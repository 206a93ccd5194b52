"""Two builds of fastbn against each other and against torch, on a loaded
machine: channels-last / (N, C) batch norm (axis -1), one worker process per
build, alternated round by round.

    python benchmarks/bn_ab_builds.py --a /path/to/base --b /path/to/new \\
        [--rounds 20] [--threads 1,2] [--dtype float32] [--axis -1] [--out] \\
        [--kinds train,backward,eval,relu_train,relu_backward] 3000x96 8x28x28x100 ...

--dtype bfloat16: x and dy in ml_dtypes.bfloat16, parameters and statistics
in float32 (torch's bf16 batch norm; torch reads the bits as int16).
--axis 1: channels-first shapes (64x128x56x56), torch on the same layout.
--out: both builds write into a preallocated output (out=), which leaves out
the page faults of a fresh output (torch still allocates).
--cpu: process CPU time instead of wall time (1 thread on a loaded machine).
--no-torch: time the builds only.  torch's OpenMP workers keep spinning after
its call and take the cores from the next fastbn call in the same process: with
torch timed, bfloat16 (64,128,56,56) backward at 2 threads took 19 ms at the
minimum against 6.8 ms without (out=, load 2.5).

--a and --b are folders that `import fastbn` finds the built package in (a
worktree built in place).  Both workers also time torch on the same arrays
(pooled).  Every timed call follows one untimed call and a 3 ms pause (see
fastbn.bench.measure.time_interleaved: idle OpenMP workers spin after a
parallel region).  Both builds allocate their output, as torch does.
Printed per row: min of A, B and torch; torch / A and torch / B from the
mins and from the medians; B / A from the mins.  The load average is
printed before and after: with other work on the machine, compare only the
alternated columns of one row, and repeat a row before believing it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker():
    import numpy as np
    import torch
    import fastbn
    from fastbn import functional as F
    nn = torch.nn.functional
    built = {}

    def tensor(array):
        if array.dtype.kind == "V":  # ml_dtypes.bfloat16: torch reads its bits as int16
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    def at_page_offset(array, offset=16):
        """A copy of `array` starting `offset` bytes past a 4 KiB page."""
        raw = np.empty(array.nbytes + 2 * 4096, np.uint8)
        start = (-raw.ctypes.data) % 4096 + offset
        copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
        copy[...] = array
        return copy

    def build(kind, shape, dtype, axis, use_out):
        key = (kind, shape, dtype, axis, use_out)
        if key in built:
            return built[key]
        built.clear()
        rng = np.random.default_rng(0)
        activations = dtype
        if dtype == "bfloat16":
            import ml_dtypes
            activations, dtype = ml_dtypes.bfloat16, "float32"
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(activations)
        dy = rng.standard_normal(shape).astype(activations)
        # x, dy and out= 16 bytes past a page, as NumPy's large arrays: the
        # output cache of every build places its outputs well against them,
        # and out= at their offset is safe; np.empty_like right after dy can
        # land 16 bytes past it modulo 4 KiB, where every kernel runs 1.5-4x
        # slower (4K aliasing, fastbn._output_cache.ALIAS_AHEAD)
        x, dy = at_page_offset(x), at_page_offset(dy)
        out = at_page_offset(np.empty_like(x)) if use_out else None
        channels = shape[axis]
        w = (rng.standard_normal(channels) * 0.5 + 1).astype(dtype)
        b = rng.standard_normal(channels).astype(dtype)
        rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
        tx, tdy = tensor(x), tensor(dy)
        if len(shape) > 2 and axis == -1:  # channels_last-strided tensors over the same memory
            tx, tdy = tx.movedim(-1, 1), tdy.movedim(-1, 1)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        if kind == "train":
            def ours():
                return F.batch_norm(x, rm, rv, w, b, training=True, axis=axis, out=out)

            def theirs():
                with torch.no_grad():
                    return nn.batch_norm(tx, trm, trv, tw, tb, training=True)
        elif kind == "relu_train":
            def ours():
                return F.batch_norm_relu_forward_train(x, w, b, axis=axis, out=out)

            def theirs():
                with torch.no_grad():
                    return nn.relu(nn.batch_norm(tx, None, None, tw, tb, training=True),
                                   inplace=True)
        elif kind == "eval":
            def ours():
                return F.batch_norm(x, rm, rv, w, b, training=False, axis=axis, out=out)

            def theirs():
                with torch.no_grad():
                    return nn.batch_norm(tx, trm, trv, tw, tb, training=False)
        elif kind == "backward":
            _, mean, invstd = F.batch_norm_forward_train(x, w, b, 1e-5, axis=axis)
            _, sm, si = torch.ops.aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5)

            def ours():
                return F.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=out)

            def theirs():
                return torch.ops.aten.native_batch_norm_backward(
                    tdy, tx, tw, None, None, sm, si, True, 1e-5, [True, True, True])
        elif kind == "relu_backward":
            _, mean, invstd = F.batch_norm_relu_forward_train(x, w, b, axis=axis)
            xg, wg, bg = (t.clone().requires_grad_(True) for t in (tx, tw, tb))
            ty = nn.relu(nn.batch_norm(xg, None, None, wg, bg, training=True))

            def ours():
                return F.batch_norm_relu_backward(dy, x, mean, invstd, w, b, axis=axis, out=out)

            def theirs():
                return torch.autograd.grad(ty, (xg, wg, bg), tdy, retain_graph=True)
        else:
            raise ValueError(f"kind: expected train, relu_train, eval, backward or "
                             f"relu_backward, got {kind!r}")
        built[key] = (ours, theirs)
        return built[key]

    for line in sys.stdin:
        request = json.loads(line)
        fastbn.set_num_threads(request["threads"])
        torch.set_num_threads(request["threads"])
        ours, theirs = build(request["kind"], tuple(request["shape"]), request["dtype"],
                             request["axis"], request["out"])
        reply = {}
        for name, fn in (("ours", ours), ("torch", theirs))[:2 if request["torch"] else 1]:
            time.sleep(0.003)
            fn()
            clock = time.process_time if request.get("cpu") else time.perf_counter
            start = clock()
            fn()
            reply[name] = clock() - start
        print(json.dumps(reply), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="folder holding the base build")
    parser.add_argument("--b", required=True, help="folder holding the new build")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--axis", type=int, default=-1, choices=[-1, 1],
                        help="channel axis of the shapes (-1: channels last)")
    parser.add_argument("--out", action="store_true", help="both builds write into out=")
    parser.add_argument("--no-torch", action="store_true", help="time the two builds only")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU time of the worker process instead of wall time (at 1 thread: "
                             "the call's own CPU time, which preemption by other work leaves out)")
    parser.add_argument("--kinds", default="train,backward")
    parser.add_argument("shapes", nargs="+", help="e.g. 3000x96 or 8x28x28x100 (channels last)")
    args = parser.parse_args()

    def spawn(path):
        env = dict(os.environ, PYTHONPATH=path)
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env, cwd="/")  # not a source tree: the build's fastbn

    workers = {"A": spawn(args.a), "B": spawn(args.b)}

    def ask(name, request):
        workers[name].stdin.write(json.dumps(request) + "\n")
        workers[name].stdin.flush()
        return json.loads(workers[name].stdout.readline())

    print("load average", open("/proc/loadavg").read().split()[:3])
    print(f"{'shape':<18} {'kind':<14} {'th':>2} {'A min':>10} {'B min':>10} {'torch min':>10}"
          f" | {'xT A':>5} {'xT B':>5} | {'med A':>5} {'med B':>5} | B/A mins (medians)")
    for threads in (int(t) for t in args.threads.split(",")):
        for kind in args.kinds.split(","):
            for text in args.shapes:
                shape = [int(v) for v in text.split("x")]
                times = {"A": [], "B": [], "torch": []}
                for index in range(args.rounds):
                    for name in ("A", "B") if index % 2 == 0 else ("B", "A"):
                        reply = ask(name, dict(kind=kind, shape=shape, dtype=args.dtype,
                                               axis=args.axis, out=args.out,
                                               torch=not args.no_torch, cpu=args.cpu,
                                               threads=threads))
                        times[name].append(reply["ours"])
                        times["torch"].append(reply.get("torch", float("nan")))
                low = {k: min(v) for k, v in times.items()}
                mid = {k: statistics.median(v) for k, v in times.items()}
                print(f"{text:<18} {kind:<14} {threads:>2} {low['A'] * 1e6:>8.1f}us"
                      f" {low['B'] * 1e6:>8.1f}us {low['torch'] * 1e6:>8.1f}us"
                      f" | {low['torch'] / low['A']:>5.2f} {low['torch'] / low['B']:>5.2f}"
                      f" | {mid['torch'] / mid['A']:>5.2f} {mid['torch'] / mid['B']:>5.2f}"
                      f" | {low['B'] / low['A']:.2f} (medians {mid['A'] * 1e6:.1f} / {mid['B'] * 1e6:.1f}us:"
                      f" {mid['B'] / mid['A']:.2f})", flush=True)
    print("load average", open("/proc/loadavg").read().split()[:3])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker()
    else:
        main()
