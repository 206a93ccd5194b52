"""Cython bridge to the batch-norm kernels (src_c/bn): the fast backend's
batch-norm methods (fastbn._backend.FastKernels binds them as they are).

Each kernel function checks that its arrays are kernel-ready (exact
ndarrays of the input's native dtype, per-channel vectors of `channels`
elements, written buffers writeable, a counter it can bump) and returns None,
having written nothing, when one is not: the caller then runs the validators
of fastbn._bn_validation, which own every rule's error message.  Scalars and
`out` buffers are the caller's to validate.  fastbn.reference._kernels has
the same functions with the same contract, in NumPy.

Inputs may have any strides: one that is not C-contiguous and aligned is
copied once here; a running statistic (IN-OUT) that needs a copy is copied
back after the kernel, so the caller's array is always updated in place.
Outputs passed as None are allocated here, which costs less than np.empty
from Python on the per-call path; large ones come from the output cache
(fastbn._output_cache), which reuses the buffers of outputs that are gone.  This
layer fills one call struct per kernel call, runs the entry of the active
SIMD target's table for the input's dtype without the GIL and turns a status
code into an exception.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t
from libc.string cimport memset

from fastbn._core cimport current_simd_target, effective_num_threads, raise_for_status

from fastbn import _output_cache

cnp.import_array()

# bfloat16 activations (ml_dtypes' NumPy dtype, optional): x, y, dy and dx in
# bfloat16, every per-channel vector float32.  Without ml_dtypes no array has
# this type number and the bfloat16 paths are unreachable.
cdef int BF16_TYPENUM = -1
try:
    import ml_dtypes as _ml_dtypes
    BF16_TYPENUM = np.dtype(_ml_dtypes.bfloat16).num
except (ImportError, AttributeError):  # optional dependency (or blocked in sys.modules)
    pass


cdef inline bint is_activation_type(int typenum) noexcept:
    """float32, float64, or bfloat16 (when ml_dtypes is installed)."""
    return typenum == cnp.NPY_FLOAT32 or typenum == cnp.NPY_FLOAT64 or typenum == BF16_TYPENUM


cdef inline int vector_type(int typenum) noexcept:
    """The dtype of the per-channel vectors of activations of `typenum`:
    the same, except float32 for bfloat16."""
    return cnp.NPY_FLOAT32 if typenum == BF16_TYPENUM else typenum

cdef extern from "bn/bn_kernels.h":
    enum:
        FB_DTYPE_F32
        FB_DTYPE_F64
        FB_DTYPE_BF16
        FB_N_DTYPES
    ctypedef struct fastbn_bn_call:
        int64_t outer, channels, inner
        int64_t row_channels
        const void *x
        const void *dy
        void *out
        const void *weight
        const void *bias
        void *running_mean
        void *running_var
        void *mean
        void *invstd
        void *dweight
        void *dbias
        double *phase_mean
        const double *phase_invstd
        double *m2
        double *sum_dy
        double *sum_dy_xhat
        const void *mask_weight
        const void *mask_bias
        double eps, momentum, count
        int accumulate, relu, num_threads
    ctypedef int (*fastbn_bn_fn)(const fastbn_bn_call *call) noexcept nogil
    ctypedef struct fastbn_bn_kernels:
        fastbn_bn_fn eval_forward[FB_N_DTYPES]
        fastbn_bn_fn train_forward[FB_N_DTYPES]
        fastbn_bn_fn backward[FB_N_DTYPES]
        fastbn_bn_fn backward_eval[FB_N_DTYPES]
        fastbn_bn_fn stats[FB_N_DTYPES]
        fastbn_bn_fn apply[FB_N_DTYPES]
        fastbn_bn_fn backward_reduce[FB_N_DTYPES]
        fastbn_bn_fn backward_apply[FB_N_DTYPES]
        int (*round_bf16)(const float *src, unsigned short *dst, int64_t n,
                          int allow_instruction) noexcept nogil
    const fastbn_bn_kernels *fastbn_bn_kernels_for(int target) nogil


cdef inline object kernel_input(object array):
    """`array` itself when the kernels can read it, else a C-contiguous copy."""
    if array is None or cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>array):
        return array
    return cnp.PyArray_NewCopy(<cnp.ndarray>array, cnp.NPY_CORDER)


cdef inline int copy_back(object target, object kernel_array) except -1:
    """After the kernel: update `target` in place if the kernel wrote a copy."""
    if kernel_array is not target:
        cnp.PyArray_CopyInto(<cnp.ndarray>target, <cnp.ndarray>kernel_array)
    return 0


# ---- kernel-ready checks ---------------------------------------------------------
# The per-call cost of a tiny batch norm is dominated by argument checking in
# Python.  These answer True for the COMMON, VALID call only; anything unusual
# (or wrong) makes a kernel function return None
# and the caller runs the Python validators in fastbn._bn_validation, which
# own every error message.  fastbn._bn_validation.is_kernel_vector and
# kernel_ready are the same tests for the NumPy kernels.

cdef inline bint is_float_array(object value, int typenum):
    """An exact ndarray of native dtype `typenum`."""
    return (type(value) is cnp.ndarray
            and cnp.PyArray_TYPE(<cnp.ndarray>value) == typenum
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>value))


cdef inline bint is_channel_vector(object value, cnp.npy_intp channels, int typenum):
    return value is None or (is_float_array(value, typenum)
                             and cnp.PyArray_NDIM(<cnp.ndarray>value) == 1
                             and cnp.PyArray_DIMS(<cnp.ndarray>value)[0] == channels)


cdef inline bint is_input(object value, int64_t outer, int64_t channels, int64_t inner):
    """An exact native float32/float64 ndarray of outer * channels * inner elements."""
    if type(value) is not cnp.ndarray:
        return False
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>value)
    return (is_activation_type(typenum)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>value)
            and cnp.PyArray_SIZE(<cnp.ndarray>value) == outer * channels * inner)


cdef inline bint is_like(object value, cnp.ndarray like):
    """An exact native ndarray of like's dtype and size (dy vs x)."""
    return (is_float_array(value, cnp.PyArray_TYPE(like))
            and cnp.PyArray_SIZE(<cnp.ndarray>value) == cnp.PyArray_SIZE(like))


cdef inline bint is_written_vector(object value, cnp.npy_intp channels, int typenum):
    """None, or a per-channel vector the kernel can write through its pointer."""
    return value is None or (is_channel_vector(value, channels, typenum)
                             and cnp.PyArray_ISCARRAY(<cnp.ndarray>value))


cdef inline bint is_updatable_pair(object running_mean, object running_var,
                                   cnp.npy_intp channels, int typenum):
    """Both None, or both writeable per-channel vectors."""
    if running_mean is None or running_var is None:
        return running_mean is None and running_var is None
    return (is_channel_vector(running_mean, channels, typenum)
            and is_channel_vector(running_var, channels, typenum)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var))


cdef inline bint is_counter(object counter):
    """A writeable, aligned, native 0-d integer array (a layer's
    num_batches_tracked; int64 unless the user assigned another)."""
    return (type(counter) is cnp.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>counter) == 0
            and cnp.PyArray_ISINTEGER(<cnp.ndarray>counter)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>counter)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>counter)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>counter))


cdef inline void bump(cnp.ndarray counter) noexcept:
    """counter += 1 for an `is_counter` array (wrapping, as NumPy's += does)."""
    cdef void *data = cnp.PyArray_DATA(counter)
    cdef Py_ssize_t size = cnp.PyArray_ITEMSIZE(counter)
    if size == 8:
        (<unsigned long long *>data)[0] += 1
    elif size == 4:
        (<unsigned int *>data)[0] += 1
    elif size == 2:
        (<unsigned short *>data)[0] += 1
    else:
        (<unsigned char *>data)[0] += 1


cdef inline void byte_extent(cnp.ndarray array, Py_ssize_t *low, Py_ssize_t *high):
    """[low, high): the bytes `array` can touch (conservative bounds)."""
    cdef Py_ssize_t start = <Py_ssize_t>cnp.PyArray_DATA(array), lo = 0, hi = 0
    cdef int i
    for i in range(cnp.PyArray_NDIM(array)):
        if cnp.PyArray_DIMS(array)[i] == 0:
            low[0] = high[0] = start
            return
        if cnp.PyArray_STRIDES(array)[i] < 0:
            lo += (cnp.PyArray_DIMS(array)[i] - 1) * cnp.PyArray_STRIDES(array)[i]
        else:
            hi += (cnp.PyArray_DIMS(array)[i] - 1) * cnp.PyArray_STRIDES(array)[i]
    low[0] = start + lo
    high[0] = start + hi + cnp.PyArray_ITEMSIZE(array)


cdef inline bint apart(cnp.ndarray out, object other):
    """True when `other` is None or its bytes cannot meet out's."""
    if other is None:
        return True
    cdef Py_ssize_t out_low, out_high, low, high
    byte_extent(out, &out_low, &out_high)
    byte_extent(<cnp.ndarray>other, &low, &high)
    return high <= out_low or low >= out_high


cdef inline bint plain_out(object out, cnp.ndarray x, object a, object b, object c, object d):
    """out is a writeable C-contiguous array shaped and typed like x that is
    x itself or provably apart from x and the vectors a-d."""
    if type(out) is not cnp.ndarray:
        return False
    cdef cnp.ndarray target = <cnp.ndarray>out
    cdef int i
    if (cnp.PyArray_TYPE(target) != cnp.PyArray_TYPE(x) or not cnp.PyArray_ISNOTSWAPPED(target)
            or cnp.PyArray_NDIM(target) != cnp.PyArray_NDIM(x)
            or not cnp.PyArray_IS_C_CONTIGUOUS(target) or not cnp.PyArray_ISWRITEABLE(target)
            or not cnp.PyArray_ISALIGNED(target)):
        return False
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(target)[i] != cnp.PyArray_DIMS(x)[i]:
            return False
    if target is not x and not apart(target, x):
        return False
    return apart(target, a) and apart(target, b) and apart(target, c) and apart(target, d)


cdef bint plain_geometry(object x, object axis, int64_t *geometry):
    """geometry[:] = (outer, channels, inner) and True when x is a native
    float32/float64 ndarray of rank >= 2 with at least 1 channel and 1 value
    per channel and axis is the int 1 or -1; False otherwise."""
    if type(x) is not cnp.ndarray or type(axis) is not int:
        return False
    cdef cnp.ndarray array = <cnp.ndarray>x
    cdef int typenum = cnp.PyArray_TYPE(array)
    cdef int ndim = cnp.PyArray_NDIM(array)
    if not is_activation_type(typenum) or ndim < 2:
        return False
    if not cnp.PyArray_ISNOTSWAPPED(array):
        return False
    cdef long channel_axis = axis
    if channel_axis == -1:
        channel_axis = ndim - 1
    elif channel_axis != 1:
        return False
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(array)
    cdef int64_t outer = 1, inner = 1
    cdef int i
    for i in range(ndim):
        if i < channel_axis:
            outer *= dims[i]
        elif i > channel_axis:
            inner *= dims[i]
    if channel_axis == ndim - 1:
        outer, inner = outer * inner, 1
    geometry[0] = outer
    geometry[1] = dims[channel_axis]
    geometry[2] = inner
    return geometry[1] > 0 and outer * inner > 0


cdef inline bint same_shape(object value, cnp.ndarray like):
    """An exact native ndarray of like's dtype and shape."""
    if not is_float_array(value, cnp.PyArray_TYPE(like)):
        return False
    cdef cnp.ndarray array = <cnp.ndarray>value
    if cnp.PyArray_NDIM(array) != cnp.PyArray_NDIM(like):
        return False
    cdef int i
    for i in range(cnp.PyArray_NDIM(like)):
        if cnp.PyArray_DIMS(array)[i] != cnp.PyArray_DIMS(like)[i]:
            return False
    return True


# The one rule of each scalar is in fastbn._bn_validation; these accept only
# the plain valid case (a float, in range), anything else goes there.

cdef inline bint plain_eps(object eps, bint batch_stats):
    return type(eps) is float and ((<double>eps > 0) if batch_stats else (<double>eps >= 0))


cdef inline bint plain_momentum(object momentum, bint update):
    if momentum is None:
        return not update
    return type(momentum) is float and 0.0 <= <double>momentum <= 1.0


cdef inline void *data_or_null(object array):
    if array is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline cnp.ndarray empty_like_array(cnp.ndarray array):
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(array), cnp.PyArray_DIMS(array),
                             cnp.PyArray_TYPE(array), 0)


# Outputs of at least this many bytes come from fastbn._output_cache (the
# freed buffers of earlier outputs, already mapped: a fresh array over 32 MB
# is page-faulted in on its first write, which costs about as much as the
# kernel); smaller ones from NumPy, whose allocator reuses freed memory by
# itself.  The call into Python (~2 us) is made only for those large
# outputs, whose kernels take 30 us and more.
cdef Py_ssize_t MIN_CACHED_BYTES = _output_cache.MIN_CACHED_BYTES
cdef object cached_array = _output_cache.new_array
# Outputs of 1 MiB and more are placed clear of the inputs read alongside
# them modulo 4 KiB (new_array; _output_cache.ALIAS_AHEAD: an output starting
# a little past an input made the kernels 1.5-4x slower on such arrays).
# Smaller ones stay where np.empty puts them: their data sits in L2, where
# the same distances cost 0-14 % (float32, 1 thread: (256, 512) training
# forward 49 us at the input's offset, 56 us 16 bytes past it; (64, 64)
# 4.2-4.4 us at any offset), less than placing them again.
cdef inline tuple input_addresses(cnp.ndarray like, object second):
    if second is None:
        return (<Py_ssize_t>cnp.PyArray_DATA(like),)
    return (<Py_ssize_t>cnp.PyArray_DATA(like),
            <Py_ssize_t>cnp.PyArray_DATA(<cnp.ndarray>second))


cdef inline cnp.ndarray output_array(cnp.ndarray like, object given, object second=None):
    """`given` (the caller's out=, already checked for shape, dtype and
    contiguity), or a new array shaped like `like`, placed clear of `like`
    and `second` (the other input, or None).  An unaligned view is refused
    before anything is written: the kernels store whole elements."""
    if given is None:
        if cnp.PyArray_NBYTES(like) >= MIN_CACHED_BYTES:
            return <cnp.ndarray>cached_array((<object>like).shape, (<object>like).dtype,
                                             input_addresses(like, second))
        return empty_like_array(like)
    if not cnp.PyArray_ISALIGNED(<cnp.ndarray>given):
        raise ValueError("out: expected an aligned array (the kernels store whole elements), "
                         "got an unaligned view")
    return <cnp.ndarray>given


cdef inline cnp.ndarray empty_vector(int64_t length, int typenum):
    cdef cnp.npy_intp dims[1]
    dims[0] = <cnp.npy_intp>length
    return cnp.PyArray_EMPTY(1, dims, typenum, 0)


# ---- one kernel call ---------------------------------------------------------------
# Each function below fills one fastbn_bn_call and runs the entry of the
# kernel's per-dtype array that matches the input's dtype: no per-dtype code.

cdef inline const fastbn_bn_kernels *kernels() noexcept:
    return fastbn_bn_kernels_for(current_simd_target())


cdef inline void start_call(fastbn_bn_call *call, int64_t outer, int64_t channels,
                            int64_t inner) noexcept:
    """Zero every field (unused buffers NULL), then set the geometry."""
    memset(call, 0, sizeof(fastbn_bn_call))
    call.outer = outer
    call.channels = channels
    call.inner = inner


cdef int run(const fastbn_bn_fn *family, cnp.ndarray array, fastbn_bn_call *call,
             str kernel) except -1:
    """family[dtype of `array`](call) without the GIL; the status becomes an
    exception, a dtype without a kernel a TypeError."""
    cdef int typenum = cnp.PyArray_TYPE(array)
    cdef fastbn_bn_fn function = NULL
    if typenum == cnp.NPY_FLOAT32:
        function = family[FB_DTYPE_F32]
    elif typenum == cnp.NPY_FLOAT64:
        function = family[FB_DTYPE_F64]
    elif typenum == BF16_TYPENUM:
        function = family[FB_DTYPE_BF16]
    if function == NULL:
        raise TypeError(f"{kernel}: the input must be float32 or float64"
                        f"{' (bfloat16 has no kernel here)' if typenum == BF16_TYPENUM else ''},"
                        f" got {array.dtype}")
    cdef int status
    call.num_threads = effective_num_threads()
    with nogil:
        status = function(call)
    return raise_for_status(status, kernel)


def eval_forward(object x, object y, int64_t outer, int64_t channels, int64_t inner,
                 object running_mean, object running_var, object weight, object bias,
                 double eps, bint relu=False):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.

    x IN (outer, channels, inner) any strides; y OUT, same shape (may be x),
    or None to allocate it; running_mean, running_var IN (channels,); weight,
    bias IN (channels,) or None.  relu: store max(y, 0) (fused ReLU).
    Returns (y, the array read as x: x itself or its C-contiguous copy), or
    None (nothing written) when an array is not kernel-ready.
    """
    if not is_input(x, outer, channels, inner):
        return None
    if not eval_vectors_ready(vector_type(cnp.PyArray_TYPE(<cnp.ndarray>x)), channels, running_mean,
                              running_var, weight, bias):
        return None
    return run_eval_forward(x, y, outer, channels, inner, running_mean, running_var, weight,
                            bias, eps, relu)


def eval_forward_at(object x, object y, object axis, object running_mean, object running_var,
                    object weight, object bias, object eps, bint relu=False):
    """`eval_forward` with the geometry read from x and the channel `axis`:
    (y, the array read as x), or None (nothing written) unless x is a
    non-empty float32/float64 ndarray of rank >= 2, axis the int 1 or -1,
    the vectors kernel-ready, eps a float >= 0 and y None, x itself or a
    writeable C-contiguous array like x whose bytes are provably apart from
    every input.  Lets a caller that got None run the validators once and
    call `eval_forward`, while the valid call crosses into the bridge once."""
    cdef int64_t geometry[3]
    if not (plain_eps(eps, False) and plain_geometry(x, axis, geometry)):
        return None
    if not eval_vectors_ready(vector_type(cnp.PyArray_TYPE(<cnp.ndarray>x)), geometry[1],
                              running_mean,
                              running_var, weight, bias):
        return None
    if y is not None and not plain_out(y, <cnp.ndarray>x, running_mean, running_var, weight,
                                       bias):
        return None
    return run_eval_forward(x, y, geometry[0], geometry[1], geometry[2], running_mean,
                            running_var, weight, bias, eps, relu)


cdef inline bint eval_vectors_ready(int typenum, int64_t channels, object running_mean,
                                    object running_var, object weight, object bias):
    return (running_mean is not None and running_var is not None
            and is_channel_vector(running_mean, channels, typenum)
            and is_channel_vector(running_var, channels, typenum)
            and is_channel_vector(weight, channels, typenum)
            and is_channel_vector(bias, channels, typenum))


cdef object run_eval_forward(object x, object y, int64_t outer, int64_t channels,
                             int64_t inner, object running_mean, object running_var,
                             object weight, object bias, double eps, bint relu):
    x = kernel_input(x)
    running_mean = kernel_input(running_mean)
    running_var = kernel_input(running_var)
    weight = kernel_input(weight)
    bias = kernel_input(bias)
    cdef cnp.ndarray out = output_array(x, y)
    cdef fastbn_bn_call call
    start_call(&call, outer, channels, inner)
    call.x = cnp.PyArray_DATA(x)
    call.out = cnp.PyArray_DATA(out)
    call.running_mean = cnp.PyArray_DATA(running_mean)
    call.running_var = cnp.PyArray_DATA(running_var)
    call.weight = data_or_null(weight)
    call.bias = data_or_null(bias)
    call.eps = eps
    call.relu = relu
    run(kernels().eval_forward, <cnp.ndarray>x, &call, "batch_norm eval forward")
    return out, x


def train_forward(object x, object y, int64_t outer, int64_t channels, int64_t inner,
                  object weight, object bias, double eps, object running_mean,
                  object running_var, object momentum, bint relu=False,
                  object counter=None):
    """Batch statistics, optional running-stat update, normalization.

    x IN (outer, channels, inner) any strides, at least 2 values per channel;
    y OUT same shape (may be x), or None to allocate it; weight, bias IN
    (channels,) or None; running_mean, running_var IN-OUT (channels,) or both
    None, sharing no memory with each other or the inputs.  momentum: the running-average factor (a float), or None for the
    cumulative average 1 / (counter + 1).  relu: store max(y, 0) (fused
    ReLU).  counter IN-OUT: None, or a writeable native 0-d integer array
    incremented after the running statistics (a layer's num_batches_tracked).
    Returns (y, saved_mean, saved_invstd, the array read as x: x itself or
    its C-contiguous copy), the means new (channels,) arrays; or None
    (nothing written) when an array is not kernel-ready or momentum is None
    without a counter.

    The running statistics and the counter change together or not at all:
    between the kernel's return and the increment no Python code runs, so a
    signal handler (KeyboardInterrupt) cannot run in between.
    """
    if not is_input(x, outer, channels, inner):
        return None
    cdef int typenum = vector_type(cnp.PyArray_TYPE(<cnp.ndarray>x))
    if not (train_vectors_ready(typenum, channels, weight, bias, running_mean, running_var)
            and stats_apart(x, weight, bias, running_mean, running_var)
            and (counter is None or is_counter(counter))):
        return None
    cdef double factor
    if momentum is None:
        if counter is None:
            return None
        factor = 1.0 / (int(counter) + 1)
    else:
        factor = momentum
    return run_train_forward(x, y, outer, channels, inner, weight, bias, eps, running_mean,
                             running_var, factor, relu, counter)


def train_forward_at(object x, object y, object axis, object weight, object bias, object eps,
                     object running_mean, object running_var, object momentum,
                     bint relu=False):
    """`train_forward` (no counter) with the geometry read from x and the
    channel `axis`: (y, saved_mean, saved_invstd, the array read as x), or
    None (nothing written) unless, as in `eval_forward_at`, every array is
    plain and kernel-ready (running statistics both None, or both writeable
    and sharing no memory with each other or the inputs), x has at least 2
    values per channel, eps is a float > 0 and momentum a float in [0, 1]
    (or None without running statistics, which are then not updated)."""
    cdef int64_t geometry[3]
    if not (plain_eps(eps, True) and plain_momentum(momentum, running_mean is not None)
            and plain_geometry(x, axis, geometry) and geometry[0] * geometry[2] >= 2):
        return None
    if not (train_vectors_ready(vector_type(cnp.PyArray_TYPE(<cnp.ndarray>x)), geometry[1],
                                weight, bias, running_mean, running_var)
            and stats_apart(x, weight, bias, running_mean, running_var)):
        return None
    if y is not None and not plain_out(y, <cnp.ndarray>x, running_mean, running_var, weight,
                                       bias):
        return None
    return run_train_forward(x, y, geometry[0], geometry[1], geometry[2], weight, bias, eps,
                             running_mean, running_var,
                             0.0 if momentum is None else <double>momentum, relu, None)


cdef inline bint train_vectors_ready(int typenum, int64_t channels, object weight,
                                     object bias, object running_mean, object running_var):
    return (is_channel_vector(weight, channels, typenum)
            and is_channel_vector(bias, channels, typenum)
            and is_updatable_pair(running_mean, running_var, channels, typenum))


cdef inline bint stats_apart(object x, object weight, object bias, object running_mean,
                             object running_var):
    """The running statistics (written) share no bytes with each other or
    with x, weight and bias (True when they are None).  Exact, as the
    validators' test (a refusal they would pass is a bug): the bounds test
    first, np.shares_memory only where the bounds meet."""
    if running_mean is None:
        return True
    cdef cnp.ndarray rm = <cnp.ndarray>running_mean, rv = <cnp.ndarray>running_var
    return (disjoint(rm, rv) and disjoint(rm, x) and disjoint(rv, x) and disjoint(rm, weight)
            and disjoint(rv, weight) and disjoint(rm, bias) and disjoint(rv, bias))


cdef inline bint disjoint(cnp.ndarray stat, object other):
    return apart(stat, other) or not np.shares_memory(stat, other)


cdef object run_train_forward(object x, object y, int64_t outer, int64_t channels,
                              int64_t inner, object weight, object bias, double eps,
                              object running_mean, object running_var, double factor,
                              bint relu, object counter):
    cdef int typenum = vector_type(cnp.PyArray_TYPE(<cnp.ndarray>x))
    x = kernel_input(x)
    weight = kernel_input(weight)
    bias = kernel_input(bias)
    cdef object rm = kernel_input(running_mean)
    cdef object rv = kernel_input(running_var)
    cdef cnp.ndarray out = output_array(x, y)
    cdef cnp.ndarray saved_mean = empty_vector(channels, typenum)
    cdef cnp.ndarray saved_invstd = empty_vector(channels, typenum)
    cdef fastbn_bn_call call
    start_call(&call, outer, channels, inner)
    call.x = cnp.PyArray_DATA(x)
    call.out = cnp.PyArray_DATA(out)
    call.weight = data_or_null(weight)
    call.bias = data_or_null(bias)
    call.mean = cnp.PyArray_DATA(saved_mean)
    call.invstd = cnp.PyArray_DATA(saved_invstd)
    call.running_mean = data_or_null(rm)
    call.running_var = data_or_null(rv)
    call.eps = eps
    call.momentum = factor
    call.relu = relu
    run(kernels().train_forward, <cnp.ndarray>x, &call, "batch_norm training forward")
    if rm is not None:
        copy_back(running_mean, rm)
        copy_back(running_var, rv)
    if counter is not None:
        bump(<cnp.ndarray>counter)
    return out, saved_mean, saved_invstd, x


def backward(object dy, object x, object dx, int64_t outer, int64_t channels,
             int64_t inner, object mean, object invstd, object weight,
             object dweight, object dbias, bint accumulate, object bias=None,
             bint relu=False):
    """Training-mode backward from the forward's saved mean and invstd.

    dy, x IN (outer, channels, inner) any strides; dx OUT same shape (may be
    dy or x), or None to allocate it; mean, invstd, weight IN (channels,)
    (weight may be None); dweight, dbias OUT (channels,) C-contiguous, or
    None (not wanted), added to when `accumulate`.  relu: dy is the gradient
    of a fused ReLU's output, masked where the forward's pre-activation
    (recomputed from x, the statistics, weight and `bias`) is <= 0.  Returns
    dx, or None (nothing written) when an array is not kernel-ready.
    """
    if not is_input(x, outer, channels, inner) or not is_like(dy, <cnp.ndarray>x):
        return None
    cdef int typenum = vector_type(cnp.PyArray_TYPE(<cnp.ndarray>x))
    if not (backward_vectors_ready(typenum, channels, mean, invstd, weight,
                                   bias if relu else None)
            and is_written_vector(dweight, channels, typenum)
            and is_written_vector(dbias, channels, typenum)):
        return None
    return run_backward(False, dy, x, dx, outer, channels, inner, mean, invstd, weight, 0.0,
                        dweight, dbias, accumulate, bias, relu)


def backward_at(object dy, object x, object dx, object axis, object mean, object invstd,
                object weight, object bias, bint relu=False):
    """`backward` with the geometry read from x and the channel `axis`, the
    parameter gradients new arrays: (dx, dweight, dbias), or None (nothing
    written) unless, as in `eval_forward_at`, every array is plain and
    kernel-ready, dy is shaped and typed like x, and dx is None, dy, x, or
    apart from every input."""
    return backward_at_axis(False, dy, x, dx, axis, mean, invstd, weight, bias, 0.0, relu)


cdef object backward_at_axis(bint eval_mode, object dy, object x, object dx, object axis,
                             object stat_a, object stat_b, object weight, object bias,
                             double eps, bint relu):
    cdef int64_t geometry[3]
    if not (plain_geometry(x, axis, geometry) and same_shape(dy, <cnp.ndarray>x)):
        return None
    cdef int typenum = vector_type(cnp.PyArray_TYPE(<cnp.ndarray>x))
    if not backward_vectors_ready(typenum, geometry[1], stat_a, stat_b, weight, bias):
        return None
    # the eval backward's dx may be dy but not x
    if dx is not None and not ((not eval_mode or dx is not x)
                               and plain_out(dx, <cnp.ndarray>x, stat_a, stat_b, weight, bias)
                               and (dx is dy or apart(<cnp.ndarray>dx, dy))):
        return None
    cdef cnp.ndarray dweight = empty_vector(geometry[1], typenum)
    cdef cnp.ndarray dbias = empty_vector(geometry[1], typenum)
    dx = run_backward(eval_mode, dy, x, dx, geometry[0], geometry[1], geometry[2], stat_a,
                      stat_b, weight, eps, dweight, dbias, False, bias, relu)
    return dx, dweight, dbias


cdef inline bint backward_vectors_ready(int typenum, int64_t channels, object stat_a,
                                        object stat_b, object weight, object bias):
    return (stat_a is not None and stat_b is not None
            and is_channel_vector(stat_a, channels, typenum)
            and is_channel_vector(stat_b, channels, typenum)
            and is_channel_vector(weight, channels, typenum)
            and is_channel_vector(bias, channels, typenum))


cdef object run_backward(bint eval_mode, object dy, object x, object dx, int64_t outer,
                         int64_t channels, int64_t inner, object stat_a, object stat_b,
                         object weight, double eps, object dweight, object dbias,
                         bint accumulate, object bias, bint relu):
    """The training backward (stat_a, stat_b: the saved mean and invstd) or,
    with `eval_mode`, the eval backward (the running statistics and eps; x
    is read only for dweight, dbias or relu, and may be None otherwise)."""
    cdef bint needs_x = not eval_mode or dweight is not None or dbias is not None or relu
    dy = kernel_input(dy)
    x = kernel_input(x) if needs_x else None
    stat_a = kernel_input(stat_a)
    stat_b = kernel_input(stat_b)
    weight = kernel_input(weight)
    bias = kernel_input(bias) if relu else None
    cdef cnp.ndarray out = output_array(dy, dx, x)
    cdef fastbn_bn_call call
    start_call(&call, outer, channels, inner)
    call.dy = cnp.PyArray_DATA(dy)
    call.x = data_or_null(x)
    call.out = cnp.PyArray_DATA(out)
    call.weight = data_or_null(weight)
    call.bias = data_or_null(bias)
    call.dweight = data_or_null(dweight)
    call.dbias = data_or_null(dbias)
    call.accumulate = accumulate
    call.relu = relu
    if eval_mode:
        call.running_mean = cnp.PyArray_DATA(stat_a)
        call.running_var = cnp.PyArray_DATA(stat_b)
        call.eps = eps
        run(kernels().backward_eval, <cnp.ndarray>dy, &call, "batch_norm eval backward")
    else:
        call.mean = cnp.PyArray_DATA(stat_a)
        call.invstd = cnp.PyArray_DATA(stat_b)
        run(kernels().backward, <cnp.ndarray>dy, &call, "batch_norm backward")
    return out


def backward_eval(object dy, object x, object dx, int64_t outer, int64_t channels,
                  int64_t inner, object running_mean, object running_var,
                  object weight, double eps, object dweight, object dbias, bint accumulate,
                  object bias=None, bint relu=False):
    """Eval-mode backward (running statistics were used in the forward).

    dy IN (outer, channels, inner) any strides; x IN same shape, or None when
    dweight and dbias are both None; dx OUT same shape (may be dy), or None
    to allocate it; running_mean, running_var, weight IN (channels,) (weight
    may be None); dweight, dbias OUT (channels,) C-contiguous, or None (not
    wanted), added to when `accumulate`.  relu: as in `backward` (x is then
    required).  Returns dx, or None (nothing written) when an array is not
    kernel-ready.
    """
    cdef bint needs_x = dweight is not None or dbias is not None or relu
    if not is_input(dy, outer, channels, inner) or (
            needs_x and not is_like(x, <cnp.ndarray>dy)):
        return None
    cdef int typenum = vector_type(cnp.PyArray_TYPE(<cnp.ndarray>dy))
    if not (backward_vectors_ready(typenum, channels, running_mean, running_var, weight,
                                   bias if relu else None)
            and is_written_vector(dweight, channels, typenum)
            and is_written_vector(dbias, channels, typenum)):
        return None
    return run_backward(True, dy, x, dx, outer, channels, inner, running_mean, running_var,
                        weight, eps, dweight, dbias, accumulate, bias, relu)


def backward_eval_at(object dy, object x, object dx, object axis, object running_mean,
                     object running_var, object weight, object bias, object eps,
                     bint relu=False):
    """`backward_eval` with the geometry read from x and the channel `axis`,
    the parameter gradients new arrays: (dx, dweight, dbias), or None
    (nothing written) unless, as in `backward_at`, every array is plain and
    kernel-ready (dx may be dy but not x) and eps is a float >= 0."""
    if not plain_eps(eps, False):
        return None
    return backward_at_axis(True, dy, x, dx, axis, running_mean, running_var, weight, bias,
                            eps, relu)


# ---- split phases ----------------------------------------------------------------
# The fused training forward and backward cut at their per-channel sums
# (src_c/bn/bn_kernels.h, "split phases"), for statistics combined across
# processes between the halves.  Per-channel statistics and sums cross the
# cut as float64: `mean`, `invstd`, `sum_dy` and `sum_dy_xhat` may be
# float64 or the input's dtype (converted here, exactly, once).
# `mask_weight`/`mask_bias`: the forward's weight and bias, read only with
# `relu` (dy is then the gradient of the fused ReLU's output and is masked
# where the forward's pre-activation is <= 0).


cdef inline object float64_vector(object vector):
    """`vector` itself when it is a C-contiguous aligned native float64
    array, else a float64 copy."""
    return cnp.PyArray_FROMANY(vector, cnp.NPY_FLOAT64, 1, 1, cnp.NPY_ARRAY_IN_ARRAY)


# A phase may run over a channel sub-range [first, stop) of a planar
# (outer, channels, inner) array (inner > 1): `channel_range=(first, stop)`.
# The C call then sees stop - first channels with a row stride of `channels`
# (fastbn_bn_call.row_channels), x/dy/out and the per-channel inputs offset
# to channel `first`.  Every array is checked here, before anything is
# written (a copy of x or out would defeat the purpose, so none is made):
# x, dy and out C-contiguous, aligned and native, of outer * channels *
# inner values; per-channel inputs of `channels` values.


cdef int64_t range_start(object channel_range, int64_t outer, int64_t channels,
                         int64_t inner, int64_t *stop) except -1:
    """first of a valid `channel_range` (its stop in *stop), else ValueError/TypeError."""
    if not isinstance(channel_range, tuple) or len(channel_range) != 2 or not all(
            isinstance(bound, (int, np.integer)) and not isinstance(bound, bool)
            for bound in channel_range):
        raise TypeError(f"channel_range: expected a (first, stop) tuple of ints, "
                        f"got {channel_range!r}")
    first, last = int(channel_range[0]), int(channel_range[1])
    if not 0 <= first < last <= channels:
        raise ValueError(f"channel_range: expected 0 <= first < stop <= channels "
                         f"({channels}), got {channel_range!r}")
    if inner <= 1 and (first, last) != (0, channels):
        raise ValueError(f"channel_range: a channel sub-range needs a planar input (more than "
                         f"one value per channel and row, inner > 1), got inner={inner} for "
                         f"range {channel_range!r} of {channels} channels")
    stop[0] = last
    return first


cdef int check_range_array(str name, object value, int64_t outer, int64_t channels,
                           int64_t inner, int typenum, bint written) except -1:
    if not (type(value) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>value) == typenum
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>value)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>value)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>value)
            and cnp.PyArray_SIZE(<cnp.ndarray>value) == outer * channels * inner
            and (not written or cnp.PyArray_ISWRITEABLE(<cnp.ndarray>value))):
        raise ValueError(f"{name}: with channel_range, expected a C-contiguous aligned native "
                         f"{'writeable ' if written else ''}ndarray of dtype "
                         f"{cnp.PyArray_DescrFromType(typenum)} and {outer * channels * inner} "
                         f"values, got {describe_array(value)}")
    return 0


cdef int check_range_vector(str name, object value, int64_t channels,
                            int typenum) except -1:
    if value is None:
        return 0
    if not (type(value) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>value) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray>value) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>value)[0] == channels):
        raise ValueError(f"{name}: with channel_range, expected a ({channels},) "
                         f"{cnp.PyArray_DescrFromType(typenum)} array (all channels), got "
                         f"{describe_array(value)}")
    return 0


cdef int64_t checked_range(object channel_range, int64_t outer, int64_t channels,
                           int64_t inner, object x, tuple arrays, tuple doubles, tuple typed,
                           int64_t *stop) except -1:
    """first of a valid `channel_range` (its stop in *stop) once every argument
    is usable with it: `arrays` ((name, array, written), ...) of x's dtype and
    whole shape, `doubles` ((name, vector), ...) float64 and `typed` of x's
    dtype, all of every channel.  Raises before anything is written."""
    cdef int64_t first = range_start(channel_range, outer, channels, inner, stop)
    cdef int typenum = (cnp.PyArray_TYPE(<cnp.ndarray>x) if type(x) is cnp.ndarray
                        else cnp.NPY_FLOAT32)
    for name, array, written in arrays:
        check_range_array(name, array, outer, channels, inner, typenum, written)
    for name, vector in doubles:
        check_range_vector(name, vector, channels, cnp.NPY_FLOAT64)
    for name, vector in typed:
        check_range_vector(name, vector, channels, typenum)
    return first


cdef str describe_array(object value):
    if isinstance(value, np.ndarray):
        flags = "C-contiguous" if value.flags.c_contiguous else "not C-contiguous"
        return f"{value.dtype} array of shape {value.shape} ({flags})"
    return type(value).__name__


cdef inline void *at_channel(object array, int64_t offset):
    """The data of `array` (or NULL) advanced by `offset` elements."""
    if array is None:
        return NULL
    return <char *>cnp.PyArray_DATA(<cnp.ndarray>array) + offset * cnp.PyArray_ITEMSIZE(
        <cnp.ndarray>array)


cdef void start_ranged_call(fastbn_bn_call *call, int64_t outer, int64_t channels,
                            int64_t inner, int64_t first, int64_t stop, object x, object dy,
                            object out, object mean, object invstd, object mask_weight,
                            object mask_bias):
    """start_call for channels [first, stop) of an (outer, channels, inner)
    array: the arrays and per-channel inputs (None: NULL) start at `first`."""
    start_call(call, outer, stop - first, inner)
    call.row_channels = channels
    call.x = at_channel(x, first * inner)
    call.dy = at_channel(dy, first * inner)
    call.out = at_channel(out, first * inner)
    call.phase_mean = <double *>at_channel(mean, first)
    call.phase_invstd = <const double *>at_channel(invstd, first)
    call.mask_weight = at_channel(mask_weight, first)
    call.mask_bias = at_channel(mask_bias, first)


def stats(object x, int64_t outer, int64_t channels, int64_t inner, object channel_range=None):
    """Per-channel mean and m2 = sum((x - mean)^2), float64.

    x IN (outer, channels, inner) any strides, at least 1 value per channel.
    Returns (mean, m2), new float64 (channels,) arrays.  With
    `channel_range` (first, stop): only those channels (see above), the
    arrays (stop - first,), bit-identical to those channels of the whole
    call.
    """
    cdef int64_t first = 0, stop = channels
    if channel_range is not None:
        first = checked_range(channel_range, outer, channels, inner, x,
                              (("x", x, False),), (), (), &stop)
    else:
        x = kernel_input(x)
    cdef cnp.ndarray mean = empty_vector(stop - first, cnp.NPY_FLOAT64)
    cdef cnp.ndarray m2 = empty_vector(stop - first, cnp.NPY_FLOAT64)
    cdef fastbn_bn_call call
    start_ranged_call(&call, outer, channels, inner, first, stop, x, None, None, None, None,
                      None, None)
    call.phase_mean = <double *>cnp.PyArray_DATA(mean)
    call.m2 = <double *>cnp.PyArray_DATA(m2)
    run(kernels().stats, <cnp.ndarray>x, &call, "batch_norm_stats")
    return mean, m2


def merge_stats(list counts, object means, object m2s):
    """The whole batch's (count, mean, m2) from P parts' `stats`.

    counts: P non-negative ints; means, m2s IN (P, channels) float64.
    Chan et al.'s parallel update applied to part 0, 1, 2, ... in that
    order (parts with count 0 skipped), so the result depends only on the
    parts and their order.  Merging part b into the running total a::

        n = na + nb;  d = mb - ma
        mean = ma + d * nb / n;  m2 = m2a + m2b + d**2 * na * nb / n

    P x channels values: NumPy arithmetic, no C kernel.  Returns (count,
    mean, m2), mean and m2 new float64 (channels,) arrays (0 where count is 0).
    """
    count = 0
    mean = np.zeros(means.shape[1])
    m2 = np.zeros(means.shape[1])
    for part_count, part_mean, part_m2 in zip(counts, means, m2s):
        if part_count == 0:
            continue
        if count == 0:
            count, mean, m2 = part_count, part_mean.copy(), part_m2.copy()
            continue
        total = count + part_count
        delta = part_mean - mean
        mean = mean + delta * part_count / total
        m2 = m2 + part_m2 + delta * delta * (count * part_count / total)
        count = total
    return count, mean, m2


def apply(object x, object y, int64_t outer, int64_t channels, int64_t inner, object mean,
          object invstd, object weight, object bias, bint relu=False,
          object channel_range=None):
    """y = (x - mean) * invstd * weight + bias (max(., 0) with relu).

    x IN (outer, channels, inner) any strides; y OUT same shape (may be x),
    or None to allocate it; mean, invstd IN (channels,); weight, bias IN
    (channels,) x's dtype, or None.  Returns y.  With `channel_range`
    (first, stop): only those channels of y are written (y is required).
    """
    cdef int64_t first = 0, stop = channels
    mean = float64_vector(mean)
    invstd = float64_vector(invstd)
    weight = kernel_input(weight)
    bias = kernel_input(bias)
    if channel_range is not None:
        first = checked_range(channel_range, outer, channels, inner, x,
                              (("x", x, False), ("y", y, True)),
                              (("mean", mean), ("invstd", invstd)),
                              (("weight", weight), ("bias", bias)), &stop)
    else:
        x = kernel_input(x)
    cdef cnp.ndarray out = output_array(x, y)
    cdef fastbn_bn_call call
    start_ranged_call(&call, outer, channels, inner, first, stop, x, None, out, mean, invstd,
                      None, None)
    call.weight = at_channel(weight, first)
    call.bias = at_channel(bias, first)
    call.relu = relu
    run(kernels().apply, <cnp.ndarray>x, &call, "batch_norm_apply")
    return out


def backward_reduce(object dy, object x, int64_t outer, int64_t channels, int64_t inner,
                    object mean, object invstd, object mask_weight=None,
                    object mask_bias=None, bint relu=False, object channel_range=None):
    """Per-channel float64 sum(dy) and sum(dy * (x - mean) * invstd).

    dy, x IN (outer, channels, inner) any strides; mean, invstd IN
    (channels,).  Returns (sum_dy, sum_dy_xhat), new float64 (channels,)
    arrays; with `channel_range` (first, stop), (stop - first,) arrays of
    those channels.
    """
    cdef int64_t first = 0, stop = channels
    mean = float64_vector(mean)
    invstd = float64_vector(invstd)
    mask_weight = kernel_input(mask_weight) if relu else None
    mask_bias = kernel_input(mask_bias) if relu else None
    if channel_range is not None:
        first = checked_range(channel_range, outer, channels, inner, x,
                              (("x", x, False), ("dy", dy, False)),
                              (("mean", mean), ("invstd", invstd)),
                              (("mask_weight", mask_weight), ("mask_bias", mask_bias)), &stop)
    else:
        dy = kernel_input(dy)
        x = kernel_input(x)
    cdef cnp.ndarray sum_dy = empty_vector(stop - first, cnp.NPY_FLOAT64)
    cdef cnp.ndarray sum_dy_xhat = empty_vector(stop - first, cnp.NPY_FLOAT64)
    cdef fastbn_bn_call call
    start_ranged_call(&call, outer, channels, inner, first, stop, x, dy, None, mean, invstd,
                      mask_weight, mask_bias)
    call.sum_dy = <double *>cnp.PyArray_DATA(sum_dy)
    call.sum_dy_xhat = <double *>cnp.PyArray_DATA(sum_dy_xhat)
    call.relu = relu
    run(kernels().backward_reduce, <cnp.ndarray>x, &call, "batch_norm_backward_reduce")
    return sum_dy, sum_dy_xhat


def backward_apply(object dy, object x, object dx, int64_t outer, int64_t channels,
                   int64_t inner, object mean, object invstd, object weight, object sum_dy,
                   object sum_dy_xhat, double count, object mask_weight=None,
                   object mask_bias=None, bint relu=False, object channel_range=None):
    """dx = weight * invstd / count * (count * dy - sum_dy - xhat * sum_dy_xhat).

    dy, x IN (outer, channels, inner) any strides; dx OUT same shape (may be
    dy or x), or None to allocate it; mean, invstd, sum_dy, sum_dy_xhat IN
    (channels,); weight IN (channels,) x's dtype, or None; count > 0.
    Returns dx.  With `channel_range` (first, stop): only those channels of
    dx are written (dx is required).
    """
    cdef int64_t first = 0, stop = channels
    mean = float64_vector(mean)
    invstd = float64_vector(invstd)
    sum_dy = float64_vector(sum_dy)
    sum_dy_xhat = float64_vector(sum_dy_xhat)
    weight = kernel_input(weight)
    mask_weight = kernel_input(mask_weight) if relu else None
    mask_bias = kernel_input(mask_bias) if relu else None
    if channel_range is not None:
        first = checked_range(channel_range, outer, channels, inner, x,
                              (("x", x, False), ("dy", dy, False), ("dx", dx, True)),
                              (("mean", mean), ("invstd", invstd), ("sum_dy", sum_dy),
                               ("sum_dy_xhat", sum_dy_xhat)),
                              (("weight", weight), ("mask_weight", mask_weight),
                               ("mask_bias", mask_bias)), &stop)
    else:
        dy = kernel_input(dy)
        x = kernel_input(x)
    cdef cnp.ndarray out = output_array(dy, dx, x)
    cdef fastbn_bn_call call
    start_ranged_call(&call, outer, channels, inner, first, stop, x, dy, out, mean, invstd,
                      mask_weight, mask_bias)
    call.sum_dy = <double *>at_channel(sum_dy, first)
    call.sum_dy_xhat = <double *>at_channel(sum_dy_xhat, first)
    call.count = count
    call.weight = at_channel(weight, first)
    call.relu = relu
    run(kernels().backward_apply, <cnp.ndarray>x, &call, "batch_norm_backward_apply")
    return out


def round_bf16(object values, bint allow_instruction=True):
    """float32 `values` (any shape) rounded to bfloat16 as the bfloat16
    kernels of the active SIMD target store them: (uint16 bit patterns of
    values' shape, True when the AVX512_BF16 conversion instruction did it).
    `allow_instruction=False` forces the portable conversion.  For tests."""
    cdef cnp.ndarray src = np.ascontiguousarray(values, dtype=np.float32)
    cdef cnp.ndarray dst = np.empty(np.shape(src), dtype=np.uint16)
    cdef const fastbn_bn_kernels *table = kernels()
    cdef int used
    with nogil:
        used = table.round_bf16(<const float *>cnp.PyArray_DATA(src),
                                    <unsigned short *>cnp.PyArray_DATA(dst),
                                    cnp.PyArray_SIZE(src), allow_instruction)
    return dst, bool(used)
