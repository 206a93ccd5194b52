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
from Python on the per-call path.  This
layer only picks the kernel table for the active SIMD target and the dtype,
releases the GIL around the call and turns a status code into an exception.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t

from fastbn._core cimport current_simd_target, effective_num_threads, raise_for_status

cnp.import_array()

cdef extern from "bn/bn_kernels.h":
    ctypedef struct fastbn_bn_kernels:
        int (*eval_forward_f32)(const float *x, float *y, int64_t outer, int64_t channels,
                                int64_t inner, const float *running_mean,
                                const float *running_var, const float *weight,
                                const float *bias, double eps, int relu, int num_threads) noexcept nogil
        int (*eval_forward_f64)(const double *x, double *y, int64_t outer, int64_t channels,
                                int64_t inner, const double *running_mean,
                                const double *running_var, const double *weight,
                                const double *bias, double eps, int relu, int num_threads) noexcept nogil
        int (*train_forward_f32)(const float *x, float *y, int64_t outer, int64_t channels,
                                 int64_t inner, const float *weight, const float *bias,
                                 double eps, float *saved_mean, float *saved_invstd,
                                 float *running_mean, float *running_var, double momentum,
                                 int relu, int num_threads) noexcept nogil
        int (*train_forward_f64)(const double *x, double *y, int64_t outer, int64_t channels,
                                 int64_t inner, const double *weight, const double *bias,
                                 double eps, double *saved_mean, double *saved_invstd,
                                 double *running_mean, double *running_var, double momentum,
                                 int relu, int num_threads) noexcept nogil
        int (*backward_f32)(const float *dy, const float *x, float *dx, int64_t outer,
                            int64_t channels, int64_t inner, const float *mean,
                            const float *invstd, const float *weight, const float *bias,
                            float *dweight, float *dbias, int accumulate, int relu,
                            int num_threads) noexcept nogil
        int (*backward_f64)(const double *dy, const double *x, double *dx, int64_t outer,
                            int64_t channels, int64_t inner, const double *mean,
                            const double *invstd, const double *weight, const double *bias,
                            double *dweight, double *dbias, int accumulate, int relu,
                            int num_threads) noexcept nogil
        int (*backward_eval_f32)(const float *dy, const float *x, float *dx, int64_t outer,
                                 int64_t channels, int64_t inner, const float *running_mean,
                                 const float *running_var, const float *weight,
                                 const float *bias, double eps, float *dweight,
                                 float *dbias, int accumulate, int relu,
                                 int num_threads) noexcept nogil
        int (*backward_eval_f64)(const double *dy, const double *x, double *dx, int64_t outer,
                                 int64_t channels, int64_t inner, const double *running_mean,
                                 const double *running_var, const double *weight,
                                 const double *bias, double eps, double *dweight,
                                 double *dbias, int accumulate, int relu,
                                 int num_threads) noexcept nogil
        int (*stats_f32)(const float *x, int64_t outer, int64_t channels, int64_t inner,
                         double *mean, double *m2, int num_threads) noexcept nogil
        int (*stats_f64)(const double *x, int64_t outer, int64_t channels, int64_t inner,
                         double *mean, double *m2, int num_threads) noexcept nogil
        int (*apply_f32)(const float *x, float *y, int64_t outer, int64_t channels,
                         int64_t inner, const double *mean, const double *invstd,
                         const float *weight, const float *bias, int relu,
                         int num_threads) noexcept nogil
        int (*apply_f64)(const double *x, double *y, int64_t outer, int64_t channels,
                         int64_t inner, const double *mean, const double *invstd,
                         const double *weight, const double *bias, int relu,
                         int num_threads) noexcept nogil
        int (*backward_reduce_f32)(const float *dy, const float *x, int64_t outer,
                                   int64_t channels, int64_t inner, const double *mean,
                                   const double *invstd, const float *mask_weight,
                                   const float *mask_bias, int relu, double *sum_dy,
                                   double *sum_dy_xhat, int num_threads) noexcept nogil
        int (*backward_reduce_f64)(const double *dy, const double *x, int64_t outer,
                                   int64_t channels, int64_t inner, const double *mean,
                                   const double *invstd, const double *mask_weight,
                                   const double *mask_bias, int relu, double *sum_dy,
                                   double *sum_dy_xhat, int num_threads) noexcept nogil
        int (*backward_apply_f32)(const float *dy, const float *x, float *dx, int64_t outer,
                                  int64_t channels, int64_t inner, const double *mean,
                                  const double *invstd, const float *weight,
                                  const double *sum_dy, const double *sum_dy_xhat,
                                  double count, const float *mask_weight,
                                  const float *mask_bias, int relu,
                                  int num_threads) noexcept nogil
        int (*backward_apply_f64)(const double *dy, const double *x, double *dx,
                                  int64_t outer, int64_t channels, int64_t inner,
                                  const double *mean, const double *invstd,
                                  const double *weight, const double *sum_dy,
                                  const double *sum_dy_xhat, double count,
                                  const double *mask_weight, const double *mask_bias,
                                  int relu, int num_threads) noexcept nogil
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
# (or wrong) makes a kernel function return None (standard_geometry: None)
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
    return ((typenum == cnp.NPY_FLOAT32 or typenum == cnp.NPY_FLOAT64)
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
            or not cnp.PyArray_IS_C_CONTIGUOUS(target) or not cnp.PyArray_ISWRITEABLE(target)):
        return False
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(target)[i] != cnp.PyArray_DIMS(x)[i]:
            return False
    if target is not x and not apart(target, x):
        return False
    return apart(target, a) and apart(target, b) and apart(target, c) and apart(target, d)


def standard_geometry(object x, object axis, object running_mean, object running_var,
                      object weight, object bias, bint batch_stats, bint update,
                      object out=None):
    """(outer, channels, inner) when the arrays of this batch-norm call are
    valid and plain: x a float32/float64 ndarray of rank >= 2, axis the int 1
    or -1, per-channel vectors matching, running statistics both given or
    both None (writeable when `update`), a non-empty input with at least 2
    values per channel with batch statistics, and `out` None, x itself, or a
    writeable C-contiguous array like x whose bytes are provably apart from
    every input.  None otherwise.  The scalars (eps, momentum) are not looked
    at: their one rule each is in fastbn._bn_validation."""
    if type(x) is not cnp.ndarray or type(axis) is not int:
        return None
    cdef cnp.ndarray array = <cnp.ndarray>x
    cdef int typenum = cnp.PyArray_TYPE(array)
    cdef int ndim = cnp.PyArray_NDIM(array)
    if (typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64) or ndim < 2:
        return None
    if not cnp.PyArray_ISNOTSWAPPED(array):
        return None
    cdef long channel_axis = axis
    if channel_axis == -1:
        channel_axis = ndim - 1
    elif channel_axis != 1:
        return None
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(array)
    cdef cnp.npy_intp channels = dims[channel_axis]
    cdef int64_t outer = 1, inner = 1
    cdef int i
    for i in range(ndim):
        if i < channel_axis:
            outer *= dims[i]
        elif i > channel_axis:
            inner *= dims[i]
    if channel_axis == ndim - 1:
        outer, inner = outer * inner, 1
    if (running_mean is None) != (running_var is None):
        return None
    if not (is_channel_vector(running_mean, channels, typenum)
            and is_channel_vector(running_var, channels, typenum)
            and is_channel_vector(weight, channels, typenum)
            and is_channel_vector(bias, channels, typenum)):
        return None
    if channels == 0 or outer * inner == 0 or (batch_stats and outer * inner < 2):
        return None  # empty input, or too few values: the Python path decides
    if update and running_mean is not None and not (
            cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var)):
        return None
    if out is not None and not plain_out(out, array, running_mean, running_var, weight, bias):
        return None
    return outer, channels, inner


cdef inline void *data_or_null(object array):
    if array is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline cnp.ndarray empty_like_array(cnp.ndarray array):
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(array), cnp.PyArray_DIMS(array),
                             cnp.PyArray_TYPE(array), 0)


cdef inline cnp.ndarray empty_vector(int64_t length, int typenum):
    cdef cnp.npy_intp dims[1]
    dims[0] = <cnp.npy_intp>length
    return cnp.PyArray_EMPTY(1, dims, typenum, 0)


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
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if not (running_mean is not None and running_var is not None
            and is_channel_vector(running_mean, channels, typenum)
            and is_channel_vector(running_var, channels, typenum)
            and is_channel_vector(weight, channels, typenum)
            and is_channel_vector(bias, channels, typenum)):
        return None
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef int fused_relu = relu
    x = kernel_input(x)
    running_mean = kernel_input(running_mean)
    running_var = kernel_input(running_var)
    weight = kernel_input(weight)
    bias = kernel_input(bias)
    cdef cnp.ndarray out = empty_like_array(x) if y is None else <cnp.ndarray>y
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(out)
    cdef void *mp = cnp.PyArray_DATA(running_mean)
    cdef void *vp = cnp.PyArray_DATA(running_var)
    cdef void *wp = data_or_null(weight)
    cdef void *bp = data_or_null(bias)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.eval_forward_f32(<const float *>xp, <float *>yp, outer, channels, inner,
                                            <const float *>mp, <const float *>vp,
                                            <const float *>wp, <const float *>bp, eps,
                                            fused_relu, nt)
    else:
        with nogil:
            status = table.eval_forward_f64(<const double *>xp, <double *>yp, outer, channels, inner,
                                            <const double *>mp, <const double *>vp,
                                            <const double *>wp, <const double *>bp, eps,
                                            fused_relu, nt)
    raise_for_status(status, "batch_norm eval forward")
    return out, x


def train_forward(object x, object y, int64_t outer, int64_t channels, int64_t inner,
                  object weight, object bias, double eps, object running_mean,
                  object running_var, object momentum, bint relu=False,
                  object counter=None):
    """Batch statistics, optional running-stat update, normalization.

    x IN (outer, channels, inner) any strides, at least 2 values per channel;
    y OUT same shape (may be x), or None to allocate it; weight, bias IN
    (channels,) or None; running_mean, running_var IN-OUT (channels,) or both
    None.  momentum: the running-average factor (a float), or None for the
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
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if not (is_channel_vector(weight, channels, typenum)
            and is_channel_vector(bias, channels, typenum)
            and is_updatable_pair(running_mean, running_var, channels, typenum)
            and (counter is None or is_counter(counter))):
        return None
    cdef double factor
    if momentum is None:
        if counter is None:
            return None
        factor = 1.0 / (int(counter) + 1)
    else:
        factor = momentum
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef int fused_relu = relu
    x = kernel_input(x)
    weight = kernel_input(weight)
    bias = kernel_input(bias)
    cdef object rm = kernel_input(running_mean)
    cdef object rv = kernel_input(running_var)
    cdef cnp.ndarray out = empty_like_array(x) if y is None else <cnp.ndarray>y
    cdef cnp.ndarray saved_mean = empty_vector(channels, typenum)
    cdef cnp.ndarray saved_invstd = empty_vector(channels, typenum)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(out)
    cdef void *wp = data_or_null(weight)
    cdef void *bp = data_or_null(bias)
    cdef void *smp = cnp.PyArray_DATA(saved_mean)
    cdef void *sip = cnp.PyArray_DATA(saved_invstd)
    cdef void *rmp = data_or_null(rm)
    cdef void *rvp = data_or_null(rv)
    if typenum == cnp.NPY_FLOAT32:
        with nogil:
            status = table.train_forward_f32(<const float *>xp, <float *>yp, outer, channels, inner,
                                             <const float *>wp, <const float *>bp, eps,
                                             <float *>smp, <float *>sip, <float *>rmp,
                                             <float *>rvp, factor, fused_relu, nt)
    else:
        with nogil:
            status = table.train_forward_f64(<const double *>xp, <double *>yp, outer, channels,
                                             inner, <const double *>wp, <const double *>bp, eps,
                                             <double *>smp, <double *>sip, <double *>rmp,
                                             <double *>rvp, factor, fused_relu, nt)
    raise_for_status(status, "batch_norm training forward")
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
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if not (mean is not None and invstd is not None
            and is_channel_vector(mean, channels, typenum)
            and is_channel_vector(invstd, channels, typenum)
            and is_channel_vector(weight, channels, typenum)
            and (not relu or is_channel_vector(bias, channels, typenum))
            and is_written_vector(dweight, channels, typenum)
            and is_written_vector(dbias, channels, typenum)):
        return None
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef int acc = accumulate
    cdef int fused_relu = relu
    dy = kernel_input(dy)
    x = kernel_input(x)
    mean = kernel_input(mean)
    invstd = kernel_input(invstd)
    weight = kernel_input(weight)
    bias = kernel_input(bias) if relu else None
    cdef cnp.ndarray out = empty_like_array(dy) if dx is None else <cnp.ndarray>dx
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(out)
    cdef void *mp = cnp.PyArray_DATA(mean)
    cdef void *ip = cnp.PyArray_DATA(invstd)
    cdef void *wp = data_or_null(weight)
    cdef void *bp = data_or_null(bias)
    cdef void *dwp = data_or_null(dweight)
    cdef void *dbp = data_or_null(dbias)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.backward_f32(<const float *>dyp, <const float *>xp, <float *>dxp,
                                        outer, channels, inner, <const float *>mp,
                                        <const float *>ip, <const float *>wp,
                                        <const float *>bp, <float *>dwp, <float *>dbp, acc,
                                        fused_relu, nt)
    else:
        with nogil:
            status = table.backward_f64(<const double *>dyp, <const double *>xp, <double *>dxp,
                                        outer, channels, inner, <const double *>mp,
                                        <const double *>ip, <const double *>wp,
                                        <const double *>bp, <double *>dwp, <double *>dbp, acc,
                                        fused_relu, nt)
    raise_for_status(status, "batch_norm backward")
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
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>dy)
    if not (running_mean is not None and running_var is not None
            and is_channel_vector(running_mean, channels, typenum)
            and is_channel_vector(running_var, channels, typenum)
            and is_channel_vector(weight, channels, typenum)
            and (not relu or is_channel_vector(bias, channels, typenum))
            and is_written_vector(dweight, channels, typenum)
            and is_written_vector(dbias, channels, typenum)):
        return None
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef int acc = accumulate
    cdef int fused_relu = relu
    dy = kernel_input(dy)
    x = kernel_input(x) if needs_x else None
    running_mean = kernel_input(running_mean)
    running_var = kernel_input(running_var)
    weight = kernel_input(weight)
    bias = kernel_input(bias) if relu else None
    cdef cnp.ndarray out = empty_like_array(dy) if dx is None else <cnp.ndarray>dx
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = data_or_null(x)
    cdef void *dxp = cnp.PyArray_DATA(out)
    cdef void *mp = cnp.PyArray_DATA(running_mean)
    cdef void *vp = cnp.PyArray_DATA(running_var)
    cdef void *wp = data_or_null(weight)
    cdef void *bp = data_or_null(bias)
    cdef void *dwp = data_or_null(dweight)
    cdef void *dbp = data_or_null(dbias)
    if cnp.PyArray_TYPE(dy) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.backward_eval_f32(<const float *>dyp, <const float *>xp, <float *>dxp,
                                             outer, channels, inner, <const float *>mp,
                                             <const float *>vp, <const float *>wp,
                                             <const float *>bp, eps, <float *>dwp,
                                             <float *>dbp, acc, fused_relu, nt)
    else:
        with nogil:
            status = table.backward_eval_f64(<const double *>dyp, <const double *>xp,
                                             <double *>dxp, outer, channels, inner,
                                             <const double *>mp, <const double *>vp,
                                             <const double *>wp, <const double *>bp, eps,
                                             <double *>dwp, <double *>dbp, acc, fused_relu,
                                             nt)
    raise_for_status(status, "batch_norm eval backward")
    return out


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


def stats(object x, int64_t outer, int64_t channels, int64_t inner):
    """Per-channel mean and m2 = sum((x - mean)^2), float64.

    x IN (outer, channels, inner) any strides, at least 1 value per channel.
    Returns (mean, m2), new float64 (channels,) arrays.
    """
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    x = kernel_input(x)
    cdef cnp.ndarray mean = empty_vector(channels, cnp.NPY_FLOAT64)
    cdef cnp.ndarray m2 = empty_vector(channels, cnp.NPY_FLOAT64)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef double *mp = <double *>cnp.PyArray_DATA(mean)
    cdef double *m2p = <double *>cnp.PyArray_DATA(m2)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.stats_f32(<const float *>xp, outer, channels, inner, mp, m2p, nt)
    else:
        with nogil:
            status = table.stats_f64(<const double *>xp, outer, channels, inner, mp, m2p, nt)
    raise_for_status(status, "batch_norm_stats")
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
          object invstd, object weight, object bias, bint relu=False):
    """y = (x - mean) * invstd * weight + bias (max(., 0) with relu).

    x IN (outer, channels, inner) any strides; y OUT same shape (may be x),
    or None to allocate it; mean, invstd IN (channels,); weight, bias IN
    (channels,) x's dtype, or None.  Returns y.
    """
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef int fused_relu = relu
    x = kernel_input(x)
    mean = float64_vector(mean)
    invstd = float64_vector(invstd)
    weight = kernel_input(weight)
    bias = kernel_input(bias)
    cdef cnp.ndarray out = empty_like_array(x) if y is None else <cnp.ndarray>y
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(out)
    cdef const double *mp = <const double *>cnp.PyArray_DATA(mean)
    cdef const double *ip = <const double *>cnp.PyArray_DATA(invstd)
    cdef void *wp = data_or_null(weight)
    cdef void *bp = data_or_null(bias)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.apply_f32(<const float *>xp, <float *>yp, outer, channels, inner, mp,
                                     ip, <const float *>wp, <const float *>bp, fused_relu, nt)
    else:
        with nogil:
            status = table.apply_f64(<const double *>xp, <double *>yp, outer, channels, inner,
                                     mp, ip, <const double *>wp, <const double *>bp,
                                     fused_relu, nt)
    raise_for_status(status, "batch_norm_apply")
    return out


def backward_reduce(object dy, object x, int64_t outer, int64_t channels, int64_t inner,
                    object mean, object invstd, object mask_weight=None,
                    object mask_bias=None, bint relu=False):
    """Per-channel float64 sum(dy) and sum(dy * (x - mean) * invstd).

    dy, x IN (outer, channels, inner) any strides; mean, invstd IN
    (channels,).  Returns (sum_dy, sum_dy_xhat), new float64 (channels,)
    arrays.
    """
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef int fused_relu = relu
    dy = kernel_input(dy)
    x = kernel_input(x)
    mean = float64_vector(mean)
    invstd = float64_vector(invstd)
    mask_weight = kernel_input(mask_weight) if relu else None
    mask_bias = kernel_input(mask_bias) if relu else None
    cdef cnp.ndarray sum_dy = empty_vector(channels, cnp.NPY_FLOAT64)
    cdef cnp.ndarray sum_dy_xhat = empty_vector(channels, cnp.NPY_FLOAT64)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef const double *mp = <const double *>cnp.PyArray_DATA(mean)
    cdef const double *ip = <const double *>cnp.PyArray_DATA(invstd)
    cdef void *wp = data_or_null(mask_weight)
    cdef void *bp = data_or_null(mask_bias)
    cdef double *s1p = <double *>cnp.PyArray_DATA(sum_dy)
    cdef double *s2p = <double *>cnp.PyArray_DATA(sum_dy_xhat)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.backward_reduce_f32(<const float *>dyp, <const float *>xp, outer,
                                               channels, inner, mp, ip, <const float *>wp,
                                               <const float *>bp, fused_relu, s1p, s2p, nt)
    else:
        with nogil:
            status = table.backward_reduce_f64(<const double *>dyp, <const double *>xp, outer,
                                               channels, inner, mp, ip, <const double *>wp,
                                               <const double *>bp, fused_relu, s1p, s2p, nt)
    raise_for_status(status, "batch_norm_backward_reduce")
    return sum_dy, sum_dy_xhat


def backward_apply(object dy, object x, object dx, int64_t outer, int64_t channels,
                   int64_t inner, object mean, object invstd, object weight, object sum_dy,
                   object sum_dy_xhat, double count, object mask_weight=None,
                   object mask_bias=None, bint relu=False):
    """dx = weight * invstd / count * (count * dy - sum_dy - xhat * sum_dy_xhat).

    dy, x IN (outer, channels, inner) any strides; dx OUT same shape (may be
    dy or x), or None to allocate it; mean, invstd, sum_dy, sum_dy_xhat IN
    (channels,); weight IN (channels,) x's dtype, or None; count > 0.
    Returns dx.
    """
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef int fused_relu = relu
    dy = kernel_input(dy)
    x = kernel_input(x)
    mean = float64_vector(mean)
    invstd = float64_vector(invstd)
    sum_dy = float64_vector(sum_dy)
    sum_dy_xhat = float64_vector(sum_dy_xhat)
    weight = kernel_input(weight)
    mask_weight = kernel_input(mask_weight) if relu else None
    mask_bias = kernel_input(mask_bias) if relu else None
    cdef cnp.ndarray out = empty_like_array(dy) if dx is None else <cnp.ndarray>dx
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(out)
    cdef const double *mp = <const double *>cnp.PyArray_DATA(mean)
    cdef const double *ip = <const double *>cnp.PyArray_DATA(invstd)
    cdef const double *s1p = <const double *>cnp.PyArray_DATA(sum_dy)
    cdef const double *s2p = <const double *>cnp.PyArray_DATA(sum_dy_xhat)
    cdef void *wp = data_or_null(weight)
    cdef void *mwp = data_or_null(mask_weight)
    cdef void *mbp = data_or_null(mask_bias)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.backward_apply_f32(<const float *>dyp, <const float *>xp,
                                              <float *>dxp, outer, channels, inner, mp, ip,
                                              <const float *>wp, s1p, s2p, count,
                                              <const float *>mwp, <const float *>mbp,
                                              fused_relu, nt)
    else:
        with nogil:
            status = table.backward_apply_f64(<const double *>dyp, <const double *>xp,
                                              <double *>dxp, outer, channels, inner, mp, ip,
                                              <const double *>wp, s1p, s2p, count,
                                              <const double *>mwp, <const double *>mbp,
                                              fused_relu, nt)
    raise_for_status(status, "batch_norm_backward_apply")
    return out
