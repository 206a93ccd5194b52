"""One rank of the fastbn.torch.SyncBatchNorm checks (started by
tests/test_torch_syncbatchnorm.py, one process per rank, gloo over a
FileStore).  Each scenario writes this rank's measurements to a JSON file;
the test process asserts on them.

Usage: python _torch_syncbn_worker.py SCENARIO RANK WORLD STORE_FILE OUT_JSON
"""
import datetime
import json
import math
import sys
import zlib

import torch
import torch.distributed as dist

import fastbn.functional
import fastbn.torch as ft

nn = torch.nn
TORCH_CLASS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
FUSED_CLASS = {2: ft.BatchNormReLU1d, 3: ft.BatchNormReLU1d, 4: ft.BatchNormReLU2d,
               5: ft.BatchNormReLU3d}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHANNELS = 5
SPATIAL = {2: (), 3: (7,), 4: (6, 7), 5: (3, 4, 5)}


def channels_last(x):
    """The same values stored with the channel dimension innermost."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def in_memory_format(x, memory_format):
    """The same values, stored contiguously, channels-last, or "strided"
    (every other element of a twice-as-long last dimension)."""
    if memory_format == "channels_last":
        return channels_last(x)
    if memory_format == "strided":
        strided = x.repeat_interleave(2, dim=-1)[..., ::2]
        assert not strided.is_contiguous()
        return strided
    return x


def relative_error(ours, reference):
    """max |ours - reference| / max |reference| (reference in float64)."""
    ours, reference = ours.detach().double(), reference.detach().double()
    scale = reference.abs().max().item() or 1.0
    return (ours - reference).abs().max().item() / scale


def gather_equal(tensor):
    """True when `tensor` has the same bits on every rank."""
    tensor = tensor.detach().contiguous()
    received = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(received, tensor)
    return all(torch.equal(other, received[0]) for other in received)


def summed_over_ranks(tensor):
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


# section: comparisons against torch's BatchNorm on the concatenated batch ---------

COMPARE_CASES = [
    # name, input rank, dtype, memory format, per-rank batches (first WORLD used), options
    ("2d_f32_uneven", 2, "float32", "contiguous", (3, 6, 4), {}),
    ("2d_f64_rank_with_batch_1", 2, "float64", "contiguous", (1, 4, 2), {}),
    ("3d_f32_channels_last_uneven", 3, "float32", "channels_last", (2, 5, 3), {}),
    ("3d_f64_contiguous", 3, "float64", "contiguous", (4, 4, 4), {}),
    ("4d_f32_contiguous_uneven", 4, "float32", "contiguous", (3, 5, 2), {}),
    ("4d_f32_channels_last_uneven", 4, "float32", "channels_last", (5, 2, 3), {}),
    ("4d_f64_contiguous_batch_1", 4, "float64", "contiguous", (1, 3, 2), {}),
    ("4d_f64_channels_last", 4, "float64", "channels_last", (3, 3, 3), {}),
    ("5d_f32_channels_last", 5, "float32", "channels_last", (2, 3, 1), {}),
    ("5d_f64_contiguous_uneven", 5, "float64", "contiguous", (1, 2, 3), {}),
    ("4d_f32_momentum_none", 4, "float32", "contiguous", (2, 3, 4), {"momentum": None}),
    ("4d_f64_affine_false", 4, "float64", "channels_last", (3, 2, 2), {"affine": False}),
    ("4d_f64_no_running_stats", 4, "float64", "contiguous", (2, 4, 3),
     {"track_running_stats": False}),
    ("2d_f64_no_bias", 2, "float64", "contiguous", (3, 2, 4), {"bias": False}),
    ("4d_f32_fused_relu", 4, "float32", "channels_last", (3, 4, 2), {"relu": True}),
    ("3d_f64_fused_relu", 3, "float64", "contiguous", (2, 3, 3), {"relu": True}),
    ("4d_f32_strided", 4, "float32", "strided", (2, 3, 2), {}),
]


def make_reference(ndim, options, generator):
    """torch's BatchNorm in float64 with random parameters and running
    statistics (identical on every rank: same generator seed)."""
    options = dict(options)
    options.pop("relu", None)
    reference = TORCH_CLASS[ndim](CHANNELS, dtype=torch.float64, **options)
    with torch.no_grad():
        if reference.weight is not None:
            reference.weight.copy_(torch.rand(CHANNELS, generator=generator,
                                              dtype=torch.float64) + 0.5)
        if reference.bias is not None:
            reference.bias.copy_(torch.randn(CHANNELS, generator=generator, dtype=torch.float64))
        if reference.running_mean is not None:
            reference.running_mean.copy_(torch.randn(CHANNELS, generator=generator,
                                                     dtype=torch.float64))
            reference.running_var.copy_(torch.rand(CHANNELS, generator=generator,
                                                   dtype=torch.float64) + 0.5)
    return reference


def make_synced(reference, ndim, dtype, options):
    """The layer under test, built the way users build it: a BatchNorm
    (torch's, or fastbn's fused one) converted with convert_sync_batchnorm."""
    options = dict(options)
    relu = options.pop("relu", False)
    local_class = FUSED_CLASS[ndim] if relu else TORCH_CLASS[ndim]
    local = local_class(CHANNELS, dtype=dtype, **options)
    local.load_state_dict({key: value.to(dtype) if value.is_floating_point() else value
                           for key, value in reference.state_dict().items()})
    model = nn.Sequential(local)
    ft.convert_sync_batchnorm(model)
    layer = model[0]
    expected_class = ft.SyncBatchNormReLU if relu else ft.SyncBatchNorm
    assert type(layer) is expected_class, type(layer)
    return layer


def run_case(name, ndim, dtype_name, memory_format, batches, options, rank, world):
    dtype = DTYPES[dtype_name]
    relu = options.get("relu", False)
    batches = batches[:world]
    start, stop = sum(batches[:rank]), sum(batches[:rank + 1])
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    reference = make_reference(ndim, options, generator)
    layer = make_synced(reference, ndim, dtype, options)
    layer.train()
    errors = {}
    same_bits_on_ranks = True
    layouts_kept = True
    outputs = []
    for step in range(2):
        shape = (sum(batches), CHANNELS, *SPATIAL[ndim])
        x_full = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3).to(dtype)
        dy_full = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        # reference: torch's BatchNorm in float64 on the concatenated batch
        x_reference = x_full.double().clone().requires_grad_()
        y_reference = reference(x_reference)
        if relu:
            y_reference = torch.relu(y_reference)
        y_reference.backward(dy_full.double())
        # this rank's part
        x = in_memory_format(x_full[start:stop].clone(), memory_format).requires_grad_()
        y = layer(x)
        y.backward(dy_full[start:stop])
        if x.shape[0] > 1 and memory_format != "strided":
            layouts_kept &= y.stride() == x.stride() and x.grad.stride() == x.stride()
        for key, ours, theirs in (("y", y, y_reference[start:stop]),
                                  ("dx", x.grad, x_reference.grad[start:stop])):
            if ours.numel():
                errors[f"{key}_step{step}"] = relative_error(ours, theirs)
        for key in ("weight", "bias"):
            ours, theirs = getattr(layer, key), getattr(reference, key)
            if theirs is not None:
                # each rank holds its share; their sum is the full-batch gradient
                errors[f"d{key}_step{step}"] = relative_error(summed_over_ranks(ours.grad),
                                                              theirs.grad)
                ours.grad = None
                theirs.grad = None
        if reference.running_mean is not None:
            errors[f"running_mean_step{step}"] = relative_error(layer.running_mean,
                                                                reference.running_mean)
            errors[f"running_var_step{step}"] = relative_error(layer.running_var,
                                                               reference.running_var)
            same_bits_on_ranks &= gather_equal(layer.running_mean)
            same_bits_on_ranks &= gather_equal(layer.running_var)
        if reference.num_batches_tracked is not None:
            errors[f"num_batches_tracked_step{step}"] = float(
                layer.num_batches_tracked.item() != reference.num_batches_tracked.item())
        outputs += [y.detach().clone(), x.grad.clone()]
    # eval: running statistics (or local batch statistics), no communication
    layer.eval()
    reference.eval()
    x_full = (torch.randn((sum(batches), CHANNELS, *SPATIAL[ndim]), generator=generator,
                          dtype=torch.float64) + 1).to(dtype)
    x = in_memory_format(x_full[start:stop], memory_format)
    calls = count_collectives(lambda: outputs.append(layer(x).detach().clone()))
    if reference.running_mean is not None and x.shape[0] > 0:
        y_reference = reference(x_full.double())
        if relu:
            y_reference = torch.relu(y_reference)
        errors["y_eval"] = relative_error(outputs[-1], y_reference[start:stop])
    parameters = [t.detach().clone() for t in layer.state_dict().values()]
    return errors, outputs + parameters, {"same_running_stats_on_every_rank": same_bits_on_ranks,
                                          "memory_format_kept": layouts_kept,
                                          "eval_collectives": calls}


def count_collectives(run):
    """Calls of torch.distributed.all_gather / all_reduce made by `run`."""
    calls = []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def counting(name):
        def collective(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return collective

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        run()
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    return len(calls)


def scenario_compare(rank, world):
    results = {}
    for name, ndim, dtype_name, memory_format, batches, options in COMPARE_CASES:
        errors, first_bits, flags = run_case(name, ndim, dtype_name, memory_format, batches,
                                             options, rank, world)
        # a second run from the same start gives the same bits
        _, second_bits, _ = run_case(name, ndim, dtype_name, memory_format, batches, options,
                                     rank, world)
        flags["same_bits_run_to_run"] = all(torch.equal(a, b)
                                            for a, b in zip(first_bits, second_bits))
        results[name] = {"dtype": dtype_name, "errors": errors, **flags}
    return results


# section: bad inputs on one rank --------------------------------------------------


def attempt(run):
    try:
        run()
    except Exception as error:  # recorded for the test process
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


def backward_failing_on_rank_1(layer, rank):
    """A backward whose local sums fail on rank 1 only."""
    from fastbn._backend import FastKernels
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = layer(x)
    original = FastKernels.__dict__["backward_reduce"]

    def failing(*args, **kwargs):
        raise MemoryError("simulated: no memory for the backward's sums")

    if rank == 1:   # the kernels' phase the layer's backward calls
        FastKernels.backward_reduce = staticmethod(failing)
    try:
        y.backward(torch.randn(y.shape))
    finally:
        FastKernels.backward_reduce = original


def scenario_mismatch(rank, world):
    results = {}
    layer = ft.SyncBatchNorm(4)
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    good = torch.randn(3, 4, 5)

    results["channels"] = attempt(lambda: layer(torch.randn(3, 4 + rank, 5)))
    results["dtype"] = attempt(lambda: layer(torch.randn(3, 4, 5, dtype=torch.float64
                                                         if rank == 1 else torch.float32)))
    results["input_rank"] = attempt(lambda: layer(torch.randn(4) if rank == 1 else good))
    results["global_batch_of_one"] = attempt(
        lambda: layer(torch.randn(1 if rank == 0 else 0, 4)))
    results["state_unchanged_after_errors"] = all(
        torch.equal(value, before[key]) for key, value in layer.state_dict().items())
    # the ranks are still in step: a valid call works on every rank
    results["valid_call_after_errors"] = attempt(lambda: layer(good).sum().backward())
    results["counter_after_valid_call"] = int(layer.num_batches_tracked)
    results["backward_failure"] = attempt(lambda: backward_failing_on_rank_1(layer, rank))
    different = ft.SyncBatchNorm(4 + rank)
    results["num_features"] = attempt(lambda: different(torch.randn(3, 4 + rank)))
    different_eps = ft.SyncBatchNorm(4, eps=1e-5 * (1 + rank))
    results["eps"] = attempt(lambda: different_eps(torch.randn(3, 4)))
    return results


# section: a 1-rank group and DistributedDataParallel ------------------------------


def scenario_single(rank, world):
    """One rank: the layer is a local BatchNorm (no collective)."""
    results = {}
    for dtype_name in ("float32", "float64"):
        dtype = DTYPES[dtype_name]
        generator = torch.Generator().manual_seed(3)
        reference = make_reference(4, {}, generator)
        layer = make_synced(reference, 4, dtype, {})
        x_full = torch.randn(6, CHANNELS, 4, 3, generator=generator, dtype=torch.float64)
        x = channels_last(x_full.to(dtype)).requires_grad_()
        x_reference = x_full.clone().requires_grad_()
        dy = torch.randn(x_full.shape, generator=generator, dtype=torch.float64)
        y = [None]

        def run():
            y[0] = layer(x)
            y[0].backward(dy.to(dtype))
        calls = count_collectives(run)
        y_reference = reference(x_reference)
        y_reference.backward(dy)
        results[dtype_name] = {
            "errors": {"y": relative_error(y[0], y_reference),
                       "dx": relative_error(x.grad, x_reference.grad),
                       "dweight": relative_error(layer.weight.grad, reference.weight.grad),
                       "dbias": relative_error(layer.bias.grad, reference.bias.grad),
                       "running_mean": relative_error(layer.running_mean, reference.running_mean),
                       "running_var": relative_error(layer.running_var, reference.running_var)},
            "collectives": calls}
    return results


def small_cnn(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).to(dtype)


def training_data(steps, batch, dtype):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 3, 6, 6, generator=generator, dtype=dtype),
             torch.randint(0, 3, (batch,), generator=generator)) for _ in range(steps)]


def scenario_ddp(rank, world):
    """DDP + convert_sync_batchnorm on WORLD ranks, each holding 1/WORLD of
    every batch, against one process on the full batches."""
    dtype = torch.float64
    steps, batch = 4, 8
    data = training_data(steps, batch, dtype)
    single = small_cnn(dtype)
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    for x, target in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(single(x), target).backward()
        optimizer.step()
    model = ft.convert_sync_batchnorm(small_cnn(dtype))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    part = batch // world
    for x, target in data:
        optimizer.zero_grad()
        local = slice(rank * part, (rank + 1) * part)
        nn.functional.cross_entropy(ddp(channels_last(x[local])), target[local]).backward()
        optimizer.step()
    errors = {key: relative_error(value, single.state_dict()[key])
              for key, value in model.state_dict().items()}
    return {"errors": errors,
            "sync_layers": sum(isinstance(m, ft.SyncBatchNorm) for m in model.modules())}


def scenario_subgroup(rank, world):
    """process_group=: ranks 0 and 1 synchronize with each other only; rank 2
    is a group of its own (a local BatchNorm)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2])]  # every rank creates every group
    group = groups[0] if rank < 2 else groups[1]
    batches = (3, 5, 4)
    generator = torch.Generator().manual_seed(11)
    reference = make_reference(4, {}, generator)
    layer = ft.SyncBatchNorm(CHANNELS, process_group=group, dtype=torch.float64)
    layer.load_state_dict(reference.state_dict())
    x_full = torch.randn(sum(batches), CHANNELS, 3, 4, generator=generator, dtype=torch.float64)
    dy_full = torch.randn(x_full.shape, generator=generator, dtype=torch.float64)
    # the batch the rank's group normalizes over
    members = slice(0, batches[0] + batches[1]) if rank < 2 else slice(sum(batches[:2]), None)
    x_reference = x_full[members].clone().requires_grad_()
    y_reference = reference(x_reference)
    y_reference.backward(dy_full[members])
    start = sum(batches[:rank]) - (0 if rank < 2 else sum(batches[:2]))
    part = slice(start, start + batches[rank])
    x = x_full[sum(batches[:rank]):sum(batches[:rank + 1])].clone().requires_grad_()
    y = layer(x)
    y.backward(dy_full[sum(batches[:rank]):sum(batches[:rank + 1])])
    return {"errors": {"y": relative_error(y, y_reference[part]),
                       "dx": relative_error(x.grad, x_reference.grad[part]),
                       "running_var": relative_error(layer.running_var,
                                                     reference.running_var)}}


BLOCK_CASES = ["4d_f32_contiguous_uneven", "4d_f64_contiguous_batch_1",
               "5d_f64_contiguous_uneven", "3d_f64_fused_relu", "4d_f32_channels_last_uneven"]


def scenario_blocks(rank, world):
    """The channel-block pipeline: block sizes from one channel per block up
    give the bits of one block (the unblocked phases); errors against
    torch's BatchNorm as in `compare`."""
    from fastbn.distributed import _pipeline
    cases = {case[0]: case for case in COMPARE_CASES}
    saved = _pipeline.BLOCK_BYTES
    results = {}
    try:
        for name in BLOCK_CASES:
            _, ndim, dtype_name, _, batches, _ = cases[name]
            channel_bytes = (max(batches[:world]) * math.prod(SPATIAL[ndim])
                             * DTYPES[dtype_name].itemsize)
            runs = []
            # one block; one channel; 2 and 3 channels per forward block (5
            # channels: blocks of 2, 2, 1 and 3, 2)
            for block_bytes in (1 << 40, 1, 2 * channel_bytes, 3 * channel_bytes + 1):
                _pipeline.BLOCK_BYTES = block_bytes
                errors, bits, _ = run_case(*cases[name], rank, world)
                runs.append((errors, bits))
            results[name] = {
                "dtype": cases[name][2],
                "errors": {key: max(run[0][key] for run in runs) for key in runs[0][0]},
                "same_bits_for_every_block_size": all(
                    len(bits) == len(runs[0][1])
                    and all(torch.equal(a, b) for a, b in zip(bits, runs[0][1]))
                    for _, bits in runs[1:])}
    finally:
        _pipeline.BLOCK_BYTES = saved
    return results


SCENARIOS = {"compare": scenario_compare, "subgroup": scenario_subgroup, "mismatch": scenario_mismatch,
             "single": scenario_single, "ddp": scenario_ddp, "blocks": scenario_blocks}


def main():
    scenario, rank, world, store, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = SCENARIOS[scenario](rank, world)
        # no rank tears the group down while another may still be receiving
        # the last collective's data from it (gloo's threads then abort the
        # other process: "terminate called without an active exception",
        # seen under load)
        dist.barrier()
        # the results are complete here: written before the teardown, which
        # still aborted a rank that way once in a CI run (session 8) after
        # the barrier; the test accepts exactly that abort after the results
        with open(out, "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
