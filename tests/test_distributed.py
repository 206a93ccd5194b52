"""fastbn.distributed and SyncBatchNorm.

The multi-rank checks are the scripts in tests/mpi/, launched here under
``mpiexec -n 1/2/3`` with a timeout (a hang fails the test instead of
blocking the suite); they skip when mpi4py or mpiexec is missing.  The
single-process tests below use a one-rank stand-in communicator and need
neither.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn import nn
from fastbn.distributed import (IN_PLACE, DataParallel, ZeroRedundancyOptimizer,
                                allreduce_gradients, broadcast_optimizer_state,
                                broadcast_parameters)
from fastbn.distributed.zero import assign_owners

MPI_SCRIPTS = Path(__file__).parent / "mpi"


class OneRankComm:
    """mpi4py's communicator methods for a world of one rank; counts calls.
    In-place reductions reach it as fastbn's IN_PLACE (declared below)."""

    fastbn_in_place = IN_PLACE

    def __init__(self):
        self.calls = []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        self.calls.append("Allgather")
        recv[...] = np.asarray(send).reshape(recv.shape)

    def Allgatherv(self, send, spec):
        self.calls.append("Allgatherv")
        spec[0][...] = send

    def Allreduce(self, send, recv):
        self.calls.append(("Allreduce", send.dtype, send.size))
        recv[...] = send

    def Bcast(self, buffer, root=0):
        self.calls.append("Bcast")

    def allgather(self, obj):
        self.calls.append("allgather")
        return [obj]

    def bcast(self, obj, root=0):
        self.calls.append("bcast")
        return obj

    def gather(self, obj, root=0):
        self.calls.append("gather")
        return [obj]


class SilentComm(OneRankComm):
    """Fails the test on any collective."""

    def __getattribute__(self, name):
        attribute = object.__getattribute__(self, name)
        if name in ("Get_rank", "Get_size") or not callable(attribute) or name.startswith("_"):
            return attribute

        def refuse(*args, **kwargs):
            raise AssertionError(f"unexpected communication: {name}")
        return refuse


# section: launching the MPI scripts ------------------------------------------------


def _mpiexec():
    beside_python = Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


def _run_under_mpiexec(script, ranks, *args, timeout=240, folder=MPI_SCRIPTS):
    pytest.importorskip("mpi4py")
    launcher = _mpiexec()
    if launcher is None:
        pytest.skip("mpiexec not found (pip install 'fastbn[mpi]')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the ranks import the same fastbn as this process
    package_root = str(Path(fastbn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [launcher, "-n", str(ranks), sys.executable, str(folder / script), *args]
    try:
        result = subprocess.run(command, cwd=MPI_SCRIPTS, env=env, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s (a hang?)\n"
                    f"{error.stdout or ''}{error.stderr or ''}")
    assert result.returncode == 0, (f"{' '.join(command)} exited with {result.returncode}\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result.stdout


RANKS = [1, 2, 3]


@pytest.mark.parametrize("ranks", RANKS)
def test_syncbatchnorm_on_ranks_matches_batchnorm_on_the_concatenated_batch(ranks):
    assert f"on {ranks} ranks" in _run_under_mpiexec("check_syncbn.py", ranks)


@pytest.mark.parametrize("ranks", RANKS)
def test_allreduce_gradients_on_ranks_gives_the_bits_of_plain_packing(ranks):
    assert f"on {ranks} ranks" in _run_under_mpiexec("check_gradients.py", ranks)


@pytest.mark.parametrize("ranks", [2, 3])
def test_syncbatchnorm_channel_blocks_give_the_unblocked_bits_on_ranks(ranks):
    assert f"on {ranks} ranks" in _run_under_mpiexec("check_syncbn_blocks.py", ranks)


@pytest.mark.parametrize("ranks", RANKS)
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(ranks):
    assert f"on {ranks} ranks" in _run_under_mpiexec("check_mismatch.py", ranks, timeout=120)


@pytest.mark.parametrize("ranks", RANKS)
def test_data_parallel_training_matches_one_process_on_full_batches(ranks):
    assert f"on {ranks} ranks" in _run_under_mpiexec("check_training.py", ranks)


@pytest.mark.parametrize("ranks", [2])
def test_zero_checkpoint_resumes_bit_exactly(ranks, tmp_path):
    assert f"on {ranks} ranks" in _run_under_mpiexec("check_zero_checkpoint.py", ranks,
                                                     str(tmp_path))


@pytest.mark.parametrize("option", [[], ["--zero"]])
def test_distributed_example_runs_on_two_ranks(option):
    out = _run_under_mpiexec("distributed_mlp.py", 2, "--steps", "2", "--width", "32",
                             "--global-batch", "16", *option, timeout=120,
                             folder=Path(__file__).parent.parent / "examples")
    assert "2 rank(s) x 1 thread(s)" in out and "examples/s" in out


# section: one process ---------------------------------------------------------------


def test_importing_fastbn_and_building_layers_does_not_import_mpi4py():
    code = ("import sys, fastbn, fastbn.distributed\n"
            "fastbn.nn.SyncBatchNorm(3)\n"
            "fastbn.nn.SyncBatchNorm.convert_sync_batchnorm(fastbn.nn.Sequential(fastbn.nn.BatchNorm1d(3)))\n"
            "assert 'mpi4py' not in sys.modules\n")
    package_root = str(Path(fastbn.__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=package_root)


def test_stand_in_communicators_reduce_in_place_without_mpi4py():
    """With mpi4py unimportable, allreduce_gradients hands a stand-in
    communicator the package's IN_PLACE sentinel (a packed bucket and a lone
    gradient alike) and imports nothing of mpi4py."""
    code = ("import sys\n"
            "sys.modules['mpi4py'] = None\n"
            "import numpy as np, fastbn\n"
            "from fastbn.distributed import IN_PLACE, allreduce_gradients\n"
            "from fastbn.distributed._comm import in_place_marker\n"
            "class Two:\n"
            "    sends = []\n"
            "    def Get_rank(self): return 0\n"
            "    def Get_size(self): return 2\n"
            "    def Allgather(self, send, recv): recv[...] = np.asarray(send).ravel()\n"
            "    def Allreduce(self, send, recv):\n"
            "        self.sends.append(send)\n"
            "        recv *= 2\n"
            "comm = Two()\n"
            "assert in_place_marker(comm) is IN_PLACE\n"
            "params = [fastbn.Parameter(np.ones(n)) for n in (3, 2, 40)]\n"
            "for param in params: param.grad = np.full_like(param.data, 5.0)\n"
            "allreduce_gradients(params, comm, average=False, bucket_bytes=8 * 5)\n"
            "assert comm.sends == [IN_PLACE, IN_PLACE], comm.sends\n"
            "assert all((param.grad == 10.0).all() for param in params)\n"
            "assert sys.modules['mpi4py'] is None\n"
            "assert 'mpi4py.MPI' not in sys.modules\n")
    package_root = str(Path(fastbn.__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=package_root)


def test_the_in_place_sentinel_is_one_object():
    import copy
    import pickle
    from fastbn.distributed._comm import in_place_marker
    assert in_place_marker(OneRankComm()) is IN_PLACE
    assert copy.deepcopy(IN_PLACE) is IN_PLACE
    assert pickle.loads(pickle.dumps(IN_PLACE)) is IN_PLACE
    assert repr(IN_PLACE) == "fastbn.distributed.IN_PLACE"


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_syncbatchnorm_on_one_rank_equals_batchnorm(axis, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 3, 4, 2)) + 3).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    comm = OneRankComm()
    channels = x.shape[axis]
    sync = nn.SyncBatchNorm(channels, axis=axis, comm=comm, dtype=dtype)
    plain = nn.BatchNorm2d(channels, axis=axis, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for _ in range(2):
        np.testing.assert_allclose(sync(x), plain(x), **tol)
        np.testing.assert_allclose(sync.backward(dy), plain.backward(dy), **tol)
    for name, value in plain.state_dict().items():
        np.testing.assert_allclose(sync.state_dict()[name], value, **tol)
    np.testing.assert_allclose(sync.weight.grad, plain.weight.grad, **tol)
    np.testing.assert_allclose(sync.bias.grad, plain.bias.grad, **tol)
    # one configuration check, then per forward ONE exchange (header and
    # statistics together: one block, the default), per backward one block
    assert comm.calls == ["Allgather"] * 5


def test_syncbatchnorm_rejected_state_leaves_running_stats_and_counter_unchanged():
    sync = nn.SyncBatchNorm(3, comm=OneRankComm())
    sync.running_mean[...] = [1.0, 2.0, 3.0]
    sync.running_var.flags.writeable = False   # refused by the base layer's checks
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="rejected by this rank's checks") as error:
        sync(x)
    assert "running_var: expected a writeable array" in str(error.value.__cause__)
    np.testing.assert_array_equal(sync.running_mean, [1.0, 2.0, 3.0])
    assert int(sync.num_batches_tracked) == 0 and sync._saved is None


def test_syncbatchnorm_training_refuses_bfloat16_activations_by_name_and_writes_nothing():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sync = nn.SyncBatchNorm(3, comm=OneRankComm())
    x = np.random.default_rng(3).standard_normal((4, 3, 2)).astype(ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="rejected by this rank's checks") as error:
        sync(x)
    cause = error.value.__cause__
    assert isinstance(cause, TypeError)
    assert "expected dtype float32 or float64 in training mode" in str(cause)
    assert "got bfloat16" in str(cause)
    np.testing.assert_array_equal(sync.running_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(sync.running_var, np.ones(3, np.float32))
    assert int(sync.num_batches_tracked) == 0 and sync._saved is None
    # eval mode normalizes bfloat16 activations as BatchNorm1d does
    plain = nn.BatchNorm1d(3).eval()
    y = sync.eval()(x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y.view(np.uint16), plain(x).view(np.uint16))


@pytest.mark.parametrize("layer_dtype, input_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_stateless_syncbatchnorm_trains_on_either_float_dtype_like_batchnorm(layer_dtype, input_dtype):
    # without parameters or buffers the layer's dtype constrains nothing (as
    # the base layer): the input's dtype is the computation's
    x = np.random.default_rng(6).standard_normal((6, 3)).astype(input_dtype)
    kwargs = dict(affine=False, track_running_stats=False, dtype=layer_dtype)
    sync = nn.SyncBatchNorm(3, comm=OneRankComm(), **kwargs)
    plain = nn.BatchNorm1d(3, **kwargs)
    y = sync(x)
    assert y.dtype == input_dtype
    np.testing.assert_allclose(y, plain(x), rtol=1e-5, atol=1e-5)


def test_syncbatchnorm_without_running_buffers_trains_like_batchnorm():
    # track_running_stats switched on after building without buffers: as the
    # base layer, batch statistics and no update (nothing to update)
    x = np.random.default_rng(4).standard_normal((6, 3)).astype(np.float32)
    sync = nn.SyncBatchNorm(3, track_running_stats=False, comm=OneRankComm())
    plain = nn.BatchNorm1d(3, track_running_stats=False)
    sync.track_running_stats = plain.track_running_stats = True
    np.testing.assert_allclose(sync(x), plain(x), rtol=1e-5, atol=1e-5)
    assert sync.running_mean is None and sync.num_batches_tracked is None


def test_syncbatchnorm_backward_with_a_bad_grad_changes_neither_grad():
    sync = nn.SyncBatchNorm(3, comm=OneRankComm())
    x = np.random.default_rng(5).standard_normal((6, 3)).astype(np.float32)
    sync(x)
    sync.weight.grad = np.ones(3, np.float32)
    sync.bias.grad = np.ones(3, np.float64)   # wrong dtype: refused before any write
    with pytest.raises(ValueError, match="rejected by this rank's checks") as error:
        sync.backward(np.ones_like(x))
    assert "bias.grad: expected dtype float32" in str(error.value.__cause__)
    np.testing.assert_array_equal(sync.weight.grad, np.ones(3, np.float32))
    np.testing.assert_array_equal(sync.bias.grad, np.ones(3))


def test_syncbatchnorm_eval_mode_does_not_communicate():
    sync = nn.SyncBatchNorm(3, comm=SilentComm()).eval()
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(sync(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
    sync.backward(np.ones_like(x))


def test_syncbatchnorm_rejects_an_object_that_is_not_a_communicator():
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator"):
        nn.SyncBatchNorm(3, comm=object())


def test_convert_sync_batchnorm_keeps_parameter_objects_and_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.3, eps=1e-3),
                          nn.Sequential(nn.BatchNormReLU1d(3, axis=-1)))
    old = [model[1], model[2][0]]
    optimizer = fastbn.optim.SGD(model.parameters(), lr=0.1)
    comm = OneRankComm()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model, comm)
    assert converted is model
    for before, after in zip(old, [model[1], model[2][0]]):
        assert isinstance(after, nn.SyncBatchNorm)
        assert after.weight is before.weight and after.bias is before.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert getattr(after, name) is getattr(before, name)
        assert (after.eps, after.momentum, after.axis, after.comm) == \
            (before.eps, before.momentum, before.axis, comm)
    assert model[2][0].fused_relu and not model[1].fused_relu
    assert [id(p) for p in model.parameters()] == \
        [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias",
                                        "1.running_mean", "1.running_var",
                                        "1.num_batches_tracked", "2.0.weight", "2.0.bias",
                                        "2.0.running_mean", "2.0.running_var",
                                        "2.0.num_batches_tracked"]
    single = nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(2), comm)
    assert isinstance(single, nn.SyncBatchNorm)


def test_converted_fused_relu_layer_matches_batchnorm_relu():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3)).astype(np.float64)
    dy = rng.standard_normal(x.shape)
    plain = nn.BatchNormReLU1d(3, dtype=np.float64)
    plain.bias.data[...] = [0.5, -0.5, 0.0]
    expected_y, expected_dx = plain(x), plain.backward(dy)
    other = nn.BatchNormReLU1d(3, dtype=np.float64)
    other.bias.data[...] = [0.5, -0.5, 0.0]
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(other, OneRankComm())
    np.testing.assert_allclose(sync(x), expected_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sync.backward(dy), expected_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sync.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


class MirrorComm(OneRankComm):
    """Rank 0 of a world of two whose other rank holds the same arrays as
    this one: an Allreduce doubles, an Allgather repeats.  Records each
    Allreduce as ("Allreduce", dtype, size, in place) and the buffer it got."""

    def __init__(self):
        super().__init__()
        self.reduced = []

    def Get_size(self):
        return 2

    def Allgather(self, send, recv):
        self.calls.append("Allgather")
        recv[...] = np.asarray(send).ravel()

    def Allreduce(self, send, recv):
        in_place = send is IN_PLACE
        source = recv if in_place else send
        self.calls.append(("Allreduce", source.dtype, source.size, in_place))
        self.reduced.append(recv)
        np.add(source, source, out=recv)

    def allgather(self, obj):
        self.calls.append("allgather")
        return [obj, obj]


def _reduces(comm):
    return [call[:3] for call in comm.calls if isinstance(call, tuple)]


def test_allreduce_gradients_packs_one_bucket_per_dtype_and_size_limit():
    params = [fastbn.Parameter(np.ones(n, dtype)) for n, dtype in
              ((10, np.float32), (6, np.float64), (20, np.float32), (5, np.float32))]
    for index, param in enumerate(params):
        param.grad = np.full_like(param.data, index + 1)
    comm = MirrorComm()
    allreduce_gradients(params, comm, bucket_bytes=4 * 30)
    # float32: 10 + 20 fill the first bucket, 5 start the next; float64: one
    assert _reduces(comm) == [("Allreduce", np.float32, 30), ("Allreduce", np.float32, 5),
                              ("Allreduce", np.float64, 6)]
    # both ranks hold the same gradients: their mean is the gradient
    for index, param in enumerate(params):
        assert np.array_equal(param.grad, np.full_like(param.data, index + 1))
    allreduce_gradients(params, comm, average=False, bucket_bytes=4 * 30)
    for index, param in enumerate(params):
        assert np.array_equal(param.grad, np.full_like(param.data, 2 * (index + 1)))


def test_allreduce_gradients_reduces_a_lone_contiguous_gradient_in_its_own_array():
    rng = np.random.default_rng(5)
    big, small = fastbn.Parameter(np.ones((4, 8))), fastbn.Parameter(np.ones(3))
    big.grad, small.grad = rng.standard_normal((4, 8)), rng.standard_normal(3)
    expected = [big.grad.copy(), small.grad.copy()]
    comm = MirrorComm()
    grad = big.grad
    allreduce_gradients([big, small], comm, average=False, bucket_bytes=8 * 8)
    assert [call[3] for call in comm.calls if isinstance(call, tuple)] == [True, True]
    assert comm.reduced[0] is grad and big.grad is grad
    assert np.array_equal(big.grad, 2 * expected[0]) and np.array_equal(small.grad, 2 * expected[1])


def test_allreduce_gradients_of_a_strided_gradient_packs_it():
    param = fastbn.Parameter(np.ones((3, 2)))
    param.grad = np.arange(12.0).reshape(3, 4)[:, ::2]
    comm = MirrorComm()
    allreduce_gradients([param], comm, average=False)
    assert comm.reduced[0] is not param.grad and comm.reduced[0].size == 6
    assert np.array_equal(param.grad, 2 * np.arange(12.0).reshape(3, 4)[:, ::2])


def test_allreduce_gradients_on_one_rank_communicates_only_the_agreement():
    params = [fastbn.Parameter(np.ones(4, np.float32)), fastbn.Parameter(np.ones(2))]
    for param in params:
        param.grad = np.full_like(param.data, 3)
    comm = OneRankComm()
    allreduce_gradients(params, comm)
    assert comm.calls == ["Allgather"]
    assert all(np.array_equal(param.grad, np.full_like(param.data, 3)) for param in params)


def test_data_parallel_keeps_its_bucket_buffers_and_renews_them_when_gradients_change():
    rng = np.random.default_rng(6)
    comm = MirrorComm()
    model = DataParallel(nn.Sequential(nn.Linear(4, 3, rng=rng, dtype=np.float64),
                                       nn.Linear(3, 2, rng=rng, dtype=np.float64)), comm)
    x = rng.standard_normal((5, 4))

    def step():
        for param in model.parameters():
            param.grad = None
        model(x)
        model.backward(np.ones((5, 2)))
        return [param.grad.copy() for param in model.parameters()]

    plain = nn.Sequential(nn.Linear(4, 3, dtype=np.float64), nn.Linear(3, 2, dtype=np.float64))
    plain.load_state_dict({k[len("module."):]: v for k, v in model.state_dict().items()})

    def expected():
        for param in plain.parameters():
            param.grad = None
        plain(x)
        plain.backward(np.ones((5, 2)))
        return [param.grad for param in plain.parameters()]

    first = step()
    buffer = comm.reduced[-1]
    assert buffer.size == 12 + 3 + 6 + 2
    second = step()
    assert comm.reduced[-1] is buffer           # the same flat array, step after step
    for got, want in zip((first, second), (expected(), expected())):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # other buckets (the weight of the first layer alone, then the rest):
    # buffers of other sizes; a lone contiguous gradient needs none
    model.bucket_bytes = 8 * 12
    third = step()
    assert all(np.array_equal(a, b) for a, b in zip(third, expected()))
    assert [call[2] for call in comm.calls[-2:]] == [12, 11]
    assert comm.reduced[-1] is not buffer and comm.reduced[-1].size == 11
    second_buffer = comm.reduced[-1]
    fourth = step()
    assert all(np.array_equal(a, b) for a, b in zip(fourth, expected()))
    # bucket 1's buffer is kept (bucket 0 needs none), the old one dropped
    assert comm.reduced[-1] is second_buffer
    assert list(model._bucket_buffers.flats) == [1]


def test_allreduce_gradients_skips_syncbatchnorm_parameters_of_a_module():
    comm = MirrorComm()
    model = nn.Sequential(nn.Linear(3, 2), nn.SyncBatchNorm(2, comm=comm))
    for param in model.parameters():
        param.grad = np.ones_like(param.data)
    allreduce_gradients(model, comm)
    assert _reduces(comm) == [("Allreduce", np.float32, 8)]
    # the SyncBatchNorm gradients are sums over the ranks already: only halved
    assert np.array_equal(model[1].weight.grad, np.full(2, 0.5, np.float32))


def test_allreduce_gradients_rejects_bad_arguments():
    comm = OneRankComm()
    with pytest.raises(ValueError, match="bucket_bytes: expected an int >= 1"):
        allreduce_gradients([fastbn.Parameter(np.ones(2))], comm, bucket_bytes=0)
    with pytest.raises(TypeError, match="average: expected a bool"):
        allreduce_gradients([fastbn.Parameter(np.ones(2))], comm, average=1)
    with pytest.raises(TypeError, match=r"params\[0\]: expected a fastbn.Parameter"):
        allreduce_gradients([np.ones(2)], comm)


def test_broadcasts_on_one_rank_keep_values_and_check_root():
    comm = OneRankComm()
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    broadcast_parameters(model, comm=comm)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"root: expected a rank in \[0, 1\), got 1"):
        broadcast_parameters(model, root=1, comm=comm)
    optimizer = fastbn.optim.Adam(model.parameters(), lr=0.1)
    broadcast_optimizer_state(optimizer, comm=comm)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_zero_assigns_largest_parameters_first_to_the_least_loaded_rank():
    # 50 -> 0; 30 -> 1; 30 -> 1 (30 < 50); 10 -> 0 (50 < 60); 5 -> 0 (tie 60-60)
    assert assign_owners([10, 50, 30, 30, 5], 2) == [0, 0, 1, 1, 0]
    assert assign_owners([4, 4, 4], 3) == [0, 1, 2]
    assert assign_owners([7], 3) == [0]


def test_zero_on_one_rank_matches_the_wrapped_optimizer_bit_for_bit():
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2, 5, 4))
    grads = rng.standard_normal((3, 2, 5, 4))
    plain_params = [fastbn.Parameter(d.copy()) for d in data]
    zero_params = [fastbn.Parameter(d.copy()) for d in data]
    plain = fastbn.optim.Adam(plain_params, lr=0.1)
    zero = ZeroRedundancyOptimizer(zero_params, fastbn.optim.Adam, comm=OneRankComm(), lr=0.1)
    for g in grads:
        for params in (plain_params, zero_params):
            for param, grad in zip(params, g):
                param.grad = grad.copy()
        plain.step()
        zero.step()
    for a, b in zip(plain_params, zero_params):
        assert np.array_equal(a.data, b.data)
    zero.consolidate_state_dict()
    state = zero.state_dict()
    expected = plain.state_dict()
    assert state["param_groups"] == expected["param_groups"]
    for index, entry in expected["state"].items():
        for key, value in entry.items():
            assert np.array_equal(state["state"][index][key], value)


def test_zero_state_dict_of_another_rank_shard_is_rejected():
    zero = ZeroRedundancyOptimizer([fastbn.Parameter(np.ones(3))], fastbn.optim.SGD,
                                   comm=OneRankComm(), lr=0.1)
    shard = zero.state_dict()
    assert shard["zero_shard"] == {"rank": 0, "world_size": 1}
    shard["zero_shard"] = {"rank": 1, "world_size": 2}
    with pytest.raises(ValueError, match="holds only the optimizer shard of rank 1 of 2"):
        zero.load_state_dict(shard)


def test_data_parallel_on_one_rank_trains_like_the_module():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3))
    dy = rng.standard_normal((8, 2))
    plain = nn.Sequential(nn.Linear(3, 2, rng=np.random.default_rng(0), dtype=np.float64))
    wrapped = DataParallel(nn.Sequential(nn.Linear(3, 2, rng=np.random.default_rng(0),
                                                   dtype=np.float64)), OneRankComm())
    np.testing.assert_array_equal(wrapped(x), plain(x))
    np.testing.assert_array_equal(wrapped.backward(dy), plain.backward(dy))
    for a, b in zip(wrapped.parameters(), plain.parameters()):
        np.testing.assert_array_equal(a.grad, b.grad)
    assert list(wrapped.state_dict()) == ["module.0.weight", "module.0.bias"]


def test_error_messages_exchange_one_line_per_rank_cut_to_the_byte_limit():
    from fastbn.distributed import _comm
    comm = MirrorComm()
    assert _comm.error_messages(comm, None) == ["", ""]
    assert _comm.error_messages(comm, ValueError("x: expected\n  3, got 4")) == \
        ["ValueError: x: expected 3, got 4"] * 2
    # cut at the byte limit, inside a 2-byte character: that character is dropped
    long = ValueError("é" * 500)
    message = _comm.error_messages(comm, long)[0]
    assert message.endswith("...") and len(message.encode()) <= _comm.MESSAGE_BYTES
    assert message.startswith("ValueError: éé")
    assert _comm.with_cause("failed", "") == "failed"
    assert _comm.with_cause("failed", "E: m") == "failed (E: m)"


PROXY_SCRIPT = """
import numpy as np
from mpi4py import MPI
from fastbn.distributed import IN_PLACE
from fastbn.distributed._comm import in_place_marker


class Proxy:
    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)


class StandIn:
    fastbn_in_place = IN_PLACE


proxy = Proxy(MPI.COMM_SELF)
assert in_place_marker(proxy) is MPI.IN_PLACE
assert in_place_marker(MPI.COMM_SELF) is MPI.IN_PLACE
assert in_place_marker(StandIn()) is IN_PLACE
buffer = np.arange(4.0)
proxy.Allreduce(in_place_marker(proxy), buffer)
assert (buffer == np.arange(4.0)).all()
print("ok")
"""


def test_a_proxy_forwarding_to_an_mpi4py_communicator_gets_mpis_in_place():
    """A wrapper whose __getattr__ forwards to a real communicator is no
    stand-in: once mpi4py is imported it gets MPI.IN_PLACE, which mpi4py
    understands (an in-place Allreduce through the proxy works); a class
    that declares fastbn_in_place gets that.  In a subprocess, so this
    process does not initialize MPI."""
    pytest.importorskip("mpi4py")
    # from the folder that holds the fastbn this process imported (the
    # repository root holds the uncompiled sources when fastbn is installed)
    package_root = str(Path(fastbn.__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-c", PROXY_SCRIPT], cwd=package_root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
