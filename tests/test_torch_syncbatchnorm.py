"""fastbn.torch.SyncBatchNorm over torch.distributed (gloo, CPU) against
torch's BatchNorm on the concatenated batch.

Each scenario starts one process per rank (tests/_torch_syncbn_worker.py)
from a neutral folder, with a FileStore in tmp_path and a timeout (a hang
fails the test instead of blocking it); the ranks write what they measured
to JSON and the tests below assert on it.  Single-process properties
(class, conversion, no communication without torch.distributed) are tested
in this process.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available()
        and torch.distributed.is_gloo_available()):  # pragma: no cover - the torch build
    pytest.skip("torch.distributed with the gloo backend is not available",
                allow_module_level=True)

import fastbn  # noqa: E402
import fastbn.torch as ft  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_torch_syncbn_worker.py"
PACKAGE_ROOT = str(Path(fastbn.__file__).resolve().parent.parent)
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
nn = torch.nn


#: What gloo prints when its threads abort a process that tears its group
#: down while a peer does the same (seen rarely, under load, after the
#: scenario's last barrier; the worker writes its results before the teardown).
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_ranks(folder: Path, scenario: str, world: int, timeout: float = 300) -> list:
    """Run `scenario` on `world` processes; returns each rank's results."""
    run = folder / f"{scenario}_{world}"
    run.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the ranks import the same fastbn as this process, not one found from the cwd
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    store = run / "store"
    processes = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(rank), str(world),
                                   str(store), str(run / f"rank{rank}.json")],
                                  cwd=run, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"{scenario} on {world} ranks did not finish within {timeout} s (a hang?)")
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        if process.returncode == -signal.SIGABRT and output.strip() == GLOO_TEARDOWN_ABORT \
                and (run / f"rank{rank}.json").exists():
            continue  # gloo aborted the process in destroy_process_group, after its results
        assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{output}"
    return [json.loads((run / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def compare_two_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("syncbn"), "compare", 2)


@pytest.fixture(scope="module")
def compare_three_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("syncbn"), "compare", 3)


@pytest.fixture(scope="module")
def mismatch_two_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("syncbn"), "mismatch", 2)


def case_names():
    sys.path.insert(0, str(WORKER.parent))
    try:
        from _torch_syncbn_worker import COMPARE_CASES
    finally:
        sys.path.pop(0)
    return [case[0] for case in COMPARE_CASES]


CASES = case_names()


# section: equal to BatchNorm on the concatenated batch -----------------------------


def assert_case_matches_full_batch(results, case):
    for rank, rank_results in enumerate(results):
        result = rank_results[case]
        tolerance = TOLERANCE[result["dtype"]]
        assert result["errors"], "nothing was compared"
        too_large = {key: error for key, error in result["errors"].items() if error > tolerance}
        assert not too_large, f"rank {rank}: relative errors above {tolerance}: {too_large}"
        assert result["same_running_stats_on_every_rank"]
        assert result["same_bits_run_to_run"]
        assert result["memory_format_kept"]
        assert result["eval_collectives"] == 0


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_batchnorm_on_the_concatenated_batch(compare_two_ranks, case):
    """Outputs, dx, summed dweight/dbias, running stats and counter, over two
    training steps and an eval step, on uneven batches and both layouts."""
    assert_case_matches_full_batch(compare_two_ranks, case)


@pytest.mark.parametrize("case", ["2d_f64_rank_with_batch_1", "4d_f32_channels_last_uneven",
                                  "5d_f64_contiguous_uneven", "4d_f32_fused_relu"])
def test_three_ranks_match_batchnorm_on_the_concatenated_batch(compare_three_ranks, case):
    assert_case_matches_full_batch(compare_three_ranks, case)


def test_channel_blocks_give_the_unblocked_bits_and_match_batchnorm(tmp_path):
    """fastbn.distributed._pipeline.BLOCK_BYTES from one channel per block
    to one block: the same bits (y, dx, parameters, running statistics),
    within tolerance of torch's BatchNorm on the concatenated batch."""
    results = run_ranks(tmp_path, "blocks", 2)
    for rank, rank_results in enumerate(results):
        assert len(rank_results) == 5
        for case, result in rank_results.items():
            assert result["same_bits_for_every_block_size"], (rank, case)
            tolerance = TOLERANCE[result["dtype"]]
            assert result["errors"], (rank, case)
            too_large = {k: e for k, e in result["errors"].items() if e > tolerance}
            assert not too_large, f"rank {rank}, {case}: {too_large}"


def test_every_compared_quantity_is_reported(compare_two_ranks):
    """The worker compared what the tests claim (so a silently skipped
    comparison fails here)."""
    errors = compare_two_ranks[0]["4d_f32_channels_last_uneven"]["errors"]
    for step in (0, 1):
        for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var",
                    "num_batches_tracked"):
            assert f"{key}_step{step}" in errors
    assert "y_eval" in errors


def test_one_rank_is_a_local_batchnorm_without_collectives(tmp_path):
    results = run_ranks(tmp_path, "single", 1)[0]
    for dtype_name, result in results.items():
        assert result["collectives"] == 0
        too_large = {key: error for key, error in result["errors"].items()
                     if error > TOLERANCE[dtype_name]}
        assert not too_large, f"{dtype_name}: {too_large}"


def test_process_group_limits_the_synchronization_to_its_ranks(tmp_path):
    """Three ranks, groups {0, 1} and {2}: ranks 0 and 1 normalize over their
    two batches, rank 2 over its own."""
    for rank, result in enumerate(run_ranks(tmp_path, "subgroup", 3)):
        too_large = {key: error for key, error in result["errors"].items() if error > 1e-10}
        assert not too_large, f"rank {rank}: {too_large}"


def test_ddp_with_converted_model_matches_one_process(tmp_path):
    """DDP + convert_sync_batchnorm on 2 ranks, each with half of every batch,
    gives the parameters and buffers of one process on the full batches."""
    results = run_ranks(tmp_path, "ddp", 2)
    for rank, result in enumerate(results):
        assert result["sync_layers"] == 2
        too_large = {key: error for key, error in result["errors"].items() if error > 1e-10}
        assert not too_large, f"rank {rank}: {too_large}"


# section: a bad input on one rank fails on every rank ------------------------------


@pytest.mark.parametrize("case, words", [("channels", "5 channels"), ("dtype", "float64"),
                                         ("input_rank", "1D input"),
                                         ("global_batch_of_one", "more than 1 value"),
                                         ("num_features", "num_features=5"),
                                         ("eps", "eps="),
                                         ("backward_failure", "backward failed on a rank")])
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(mismatch_two_ranks, case,
                                                                   words):
    errors = [rank_results[case] for rank_results in mismatch_two_ranks]
    assert all(error["type"] == "ValueError" for error in errors), errors
    assert errors[0]["message"] == errors[1]["message"]
    assert words in errors[0]["message"]


def test_failed_calls_leave_the_layer_unchanged_and_the_ranks_in_step(mismatch_two_ranks):
    for rank_results in mismatch_two_ranks:
        assert rank_results["state_unchanged_after_errors"]
        assert rank_results["valid_call_after_errors"]["type"] is None
        assert rank_results["counter_after_valid_call"] == 1


# section: in this process ----------------------------------------------------------


def test_sync_batchnorm_has_torch_sync_batchnorms_state_dict_both_ways():
    ours = ft.SyncBatchNorm(6, momentum=0.3)
    theirs = nn.SyncBatchNorm(6, momentum=0.3)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        theirs.running_mean.uniform_()
        theirs.weight.uniform_()
        theirs.num_batches_tracked.fill_(3)
    ours.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        ours.bias.uniform_()
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.bias, ours.bias)


def test_sync_batchnorm_is_not_torchs_class_so_ddp_accepts_it_on_cpu():
    """DistributedDataParallel raises for a CPU model containing a
    torch.nn.SyncBatchNorm (checked with isinstance)."""
    assert not isinstance(ft.SyncBatchNorm(3), nn.SyncBatchNorm)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_without_torch_distributed_the_layer_is_a_local_batchnorm(memory_format):
    """No process group: torch's rule (batch statistics of this batch only)."""
    assert not torch.distributed.is_initialized()
    ours = ft.SyncBatchNorm(4, dtype=torch.float64)
    theirs = nn.BatchNorm2d(4, dtype=torch.float64)
    x = torch.randn(5, 4, 3, 6, dtype=torch.float64).to(memory_format=memory_format)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(5, 4, 3, 6, dtype=torch.float64)
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    for a, b in ((y_ours, y_theirs), (x_ours.grad, x_theirs.grad),
                 (ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad),
                 (ours.running_var, theirs.running_var)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(ours.num_batches_tracked) == 1


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None),
                          nn.Sequential(nn.Linear(2, 3), ft.BatchNorm1d(3, eps=1e-3)),
                          ft.BatchNormReLU2d(4), nn.Identity())
    model[1].eval()
    tensors = {name: tensor for name, tensor in
               list(model.named_parameters()) + list(model.named_buffers())}
    keys = list(model.state_dict())
    converted = ft.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is ft.SyncBatchNorm and type(model[2][1]) is ft.SyncBatchNorm
    assert type(model[3]) is ft.SyncBatchNormReLU
    assert model[1].momentum is None and model[2][1].eps == 1e-3
    assert not model[1].training and model[3].training
    assert list(model.state_dict()) == keys
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert tensor is tensors[name], name


def test_convert_sync_batchnorm_returns_a_new_layer_for_a_layer_and_keeps_process_group():
    layer = nn.BatchNorm1d(3, affine=True, bias=False)
    group = object()  # stored, not used until a distributed forward
    converted = ft.SyncBatchNorm.convert_sync_batchnorm(layer, process_group=group)
    assert type(converted) is ft.SyncBatchNorm
    assert converted.process_group is group
    assert converted.weight is layer.weight and converted.bias is None
    assert ft.convert_sync_batchnorm(converted) is converted


def test_convert_sync_batchnorm_rejects_a_non_module():
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module, got list"):
        ft.convert_sync_batchnorm([nn.BatchNorm1d(3)])


def test_fused_sync_layer_without_distributed_equals_batchnorm_then_relu():
    ours = ft.SyncBatchNormReLU(3, dtype=torch.float64)
    theirs = nn.BatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), torch.relu(theirs(x)), rtol=1e-12, atol=1e-12)


def test_torch_syncbn_example_trains_with_ddp_and_times_the_layers(tmp_path):
    example = WORKER.parent.parent / "examples" / "torch_syncbn.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        result = subprocess.run([sys.executable, str(example), "--steps", "2", "--shape",
                                 "4,8,6,6", "--repeats", "2"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("examples/torch_syncbn.py did not finish within 300 s (a hang?)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running statistics identical on all 2 ranks: True" in result.stdout
    assert "SyncBatchNorm / local fastbn BatchNorm2d" in result.stdout
    assert "step 1: loss per rank" in result.stdout
