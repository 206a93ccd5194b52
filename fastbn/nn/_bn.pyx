"""Cython bridge to the batch-norm kernels (src_c/bn).

Callers (fastbn.functional) have already validated everything: dtypes match,
arrays are C-contiguous, per-channel vectors have `channels` elements.  This
layer only picks the kernel table for the active SIMD target and the dtype,
releases the GIL around the call and turns a status code into an exception.
"""
cimport numpy as cnp
from libc.stdint cimport int64_t

from fastbn._core cimport current_simd_target, effective_num_threads

cnp.import_array()

cdef extern from "bn/bn_kernels.h":
    ctypedef struct fastbn_bn_kernels:
        int (*eval_forward_f32)(const float *x, float *y, int64_t outer, int64_t channels,
                                int64_t inner, const float *running_mean,
                                const float *running_var, const float *weight,
                                const float *bias, double eps, int num_threads) noexcept nogil
        int (*eval_forward_f64)(const double *x, double *y, int64_t outer, int64_t channels,
                                int64_t inner, const double *running_mean,
                                const double *running_var, const double *weight,
                                const double *bias, double eps, int num_threads) noexcept nogil
    const fastbn_bn_kernels *fastbn_bn_kernels_for(int target) nogil


cdef inline void *data_or_null(object array):
    if array is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>array)


cdef int raise_for_status(int status, str kernel) except -1:
    if status == 0:
        return 0
    if status == -2:
        raise MemoryError(f"{kernel}: could not allocate the per-channel workspace")
    raise RuntimeError(f"{kernel}: kernel rejected its arguments (status {status}); "
                       "this is a bug in fastbn's validation, please report it")


def eval_forward(cnp.ndarray x, cnp.ndarray y, int64_t outer, int64_t channels, int64_t inner,
                 cnp.ndarray running_mean, cnp.ndarray running_var, object weight, object bias,
                 double eps):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.

    x IN (outer, channels, inner) C-contiguous; y OUT, same shape (may be x);
    running_mean, running_var IN (channels,); weight, bias IN (channels,) or None.
    """
    cdef const fastbn_bn_kernels *table = fastbn_bn_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef int status
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef void *mp = cnp.PyArray_DATA(running_mean)
    cdef void *vp = cnp.PyArray_DATA(running_var)
    cdef void *wp = data_or_null(weight)
    cdef void *bp = data_or_null(bias)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = table.eval_forward_f32(<const float *>xp, <float *>yp, outer, channels, inner,
                                            <const float *>mp, <const float *>vp,
                                            <const float *>wp, <const float *>bp, eps, nt)
    else:
        with nogil:
            status = table.eval_forward_f64(<const double *>xp, <double *>yp, outer, channels, inner,
                                            <const double *>mp, <const double *>vp,
                                            <const double *>wp, <const double *>bp, eps, nt)
    raise_for_status(status, "batch_norm eval forward")
    return y
