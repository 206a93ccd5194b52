"""Runtime configuration shared by the kernel bridges: CPU features, SIMD
target selection, OpenMP status and the thread-count policy.

Compiled with baseline flags only, so importing it is safe on any x86-64.
"""
cdef extern from "common/cpu_features.h":
    int fastbn_cpu_has_avx2()
    int fastbn_cpu_has_avx512()
    int fastbn_target_compiled(int target)

cdef extern from "common/fb_parallel.h":
    int FASTBN_HAVE_OPENMP
    int fb_max_threads() nogil
    void fb_set_max_threads(int n) nogil

cdef extern from "common/bandwidth_probe.h":
    double fastbn_stream_probe(double *dst, const double *src, long long n, int num_threads,
                             int repeats) nogil

cdef extern from "common/fork_guard.h":
    int fastbn_install_fork_guard()
    int fastbn_in_forked_child() nogil

TARGET_NAMES = ("baseline", "avx2", "avx512")

cdef int _simd_target = 0
cdef int _user_threads = 0   # 0: not set by set_num_threads
# The OpenMP default at import (OMP_NUM_THREADS or the core count), restored
# by set_num_threads(None) after an explicit count changed the runtime's.
cdef int _default_threads = fb_max_threads()

fastbn_install_fork_guard()


def cpu_supports(int target) -> bool:
    """True when this CPU and OS can execute the given target index."""
    if target == 0:
        return True
    if target == 1:
        return bool(fastbn_cpu_has_avx2())
    if target == 2:
        return bool(fastbn_cpu_has_avx512())
    return False


def target_compiled(int target) -> bool:
    return bool(fastbn_target_compiled(target))


def set_target_index(int target) -> None:
    global _simd_target
    _simd_target = target


def get_target_index() -> int:
    return _simd_target


def openmp_enabled() -> bool:
    return bool(FASTBN_HAVE_OPENMP)


def omp_max_threads() -> int:
    return fb_max_threads()


def set_user_threads(int n) -> None:
    """Record an explicit thread count (0 clears it) and tell the OpenMP
    runtime, so threadpoolctl reports it too."""
    global _user_threads
    _user_threads = n
    fb_set_max_threads(n if n > 0 else _default_threads)


def get_user_threads() -> int:
    return _user_threads


cdef int raise_for_status(int status, str kernel) except -1:
    if status == 0:
        return 0
    if status == -2:
        raise MemoryError(f"{kernel}: could not allocate kernel workspace")
    raise RuntimeError(f"{kernel}: kernel rejected its arguments (status {status}); "
                       "this is a bug in fastbn's validation, please report it")


def in_forked_child() -> bool:
    return bool(fastbn_in_forked_child())


def num_threads() -> int:
    return effective_num_threads()


cdef int effective_num_threads() noexcept:
    # The OpenMP limit of the calling thread (OMP_NUM_THREADS, threadpoolctl)
    # caps an explicit set_num_threads(); in a forked child libgomp's pool is
    # gone, so everything runs serially there.
    if fastbn_in_forked_child():
        return 1
    cdef int n = fb_max_threads()
    if _user_threads > 0 and _user_threads < n:
        n = _user_threads
    return n if n > 0 else 1


cdef int current_simd_target() noexcept nogil:
    return _simd_target


def stream_probe_seconds(double[::1] destination, const double[::1] source, int num_threads,
                       int repeats) -> float:
    """Best time of `repeats` parallel passes destination += 0.5 * source
    (see src_c/common/bandwidth_probe.h); the GIL is released."""
    if destination.shape[0] != source.shape[0]:
        raise ValueError("destination and source must have the same length")
    cdef double seconds
    with nogil:
        seconds = fastbn_stream_probe(&destination[0], &source[0], source.shape[0],
                                    num_threads, repeats)
    return seconds
