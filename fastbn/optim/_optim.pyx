"""Cython bridge to the fused multi-tensor optimizer kernels (src_c/optim).

A step of one param group becomes one kernel call per dtype.  `GroupPlan`
walks the group's parameters once (a few hundred nanoseconds each: slot
reads, flag checks and pointer copies, no NumPy calls on the fast path) and
fills C arrays of (param, grad, state...) pointers and sizes; the kernel then
updates every tensor in one parallel region with the GIL released.

The work of `Optimizer.step` is split so that a bad gradient anywhere leaves
every parameter and every state untouched:
1. `GroupPlan(...)` for every group: validate data and gradients, take pointers;
2. `bind_state` for every group: find or create state, compute per-tensor
   coefficients from the step counters each parameter is about to reach;
3. `commit_and_run` for every group: write the new step counters, run the kernels.
Validation failures are reported by the same Python checks the reference
backend uses (fastbn.optim.optimizer.checked_grad), so messages are identical.
"""
cimport numpy as cnp
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.long cimport PyLong_AsLongLong, PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject
from libc.math cimport sqrt
from libc.stdint cimport int64_t

from fastbn._core cimport current_simd_target, effective_num_threads, raise_for_status

cnp.import_array()

cdef extern from "optim/optim_kernels.h":
    int64_t FASTBN_OPTIM_CHUNK
    int FASTBN_OPTIM_MAX_STATE
    enum:
        FASTBN_OPTIM_MAXIMIZE
        FASTBN_OPTIM_WEIGHT_DECAY
        FASTBN_OPTIM_MOMENTUM
        FASTBN_OPTIM_NESTEROV
        FASTBN_OPTIM_CENTERED
        FASTBN_OPTIM_AMSGRAD
        FASTBN_OPTIM_DECOUPLED
    enum:
        FASTBN_OPTIM_FAMILY_SGD
        FASTBN_OPTIM_FAMILY_MOMENTUM
        FASTBN_OPTIM_FAMILY_RMSPROP
        FASTBN_OPTIM_FAMILY_ADAM
        FASTBN_OPTIM_FAMILY_ADAGRAD
        FASTBN_OPTIM_FAMILY_LION
        FASTBN_OPTIM_N_FAMILIES

    ctypedef struct fastbn_optim_batch:
        int64_t n_tensors
        int64_t n_elements
        void **param
        const void **grad
        void **state[3]
        const int64_t *size
        const int64_t *chunk_start
        const double *coefficients
        int64_t coefficient_stride

    ctypedef int (*fastbn_optim_step_fn)(const fastbn_optim_batch *batch, const double *scalars,
                                         int flags, int num_threads) noexcept nogil

    ctypedef struct fastbn_optim_kernels:
        fastbn_optim_step_fn step_f32[6]
        fastbn_optim_step_fn step_f64[6]
        int (*sumsq_f32)(const fastbn_optim_batch *batch, double *partials, double *result,
                         int num_threads) noexcept nogil
        int (*sumsq_f64)(const fastbn_optim_batch *batch, double *partials, double *result,
                         int num_threads) noexcept nogil
        int (*maxabs_f32)(const fastbn_optim_batch *batch, double *partials, double *result,
                          int num_threads) noexcept nogil
        int (*maxabs_f64)(const fastbn_optim_batch *batch, double *partials, double *result,
                          int num_threads) noexcept nogil
        int (*scale_f32)(const fastbn_optim_batch *batch, double factor, int num_threads) noexcept nogil
        int (*scale_f64)(const fastbn_optim_batch *batch, double factor, int num_threads) noexcept nogil

    const fastbn_optim_kernels *fastbn_optim_kernels_for(int target) nogil
    int64_t fastbn_optim_chunks_of(int64_t size) nogil

from fastbn.optim.optimizer import checked_grad

FAMILIES = {"sgd": FASTBN_OPTIM_FAMILY_SGD, "momentum": FASTBN_OPTIM_FAMILY_MOMENTUM,
            "rmsprop": FASTBN_OPTIM_FAMILY_RMSPROP, "adam": FASTBN_OPTIM_FAMILY_ADAM,
            "adagrad": FASTBN_OPTIM_FAMILY_ADAGRAD, "lion": FASTBN_OPTIM_FAMILY_LION}
FLAGS = {"maximize": FASTBN_OPTIM_MAXIMIZE, "weight_decay": FASTBN_OPTIM_WEIGHT_DECAY,
         "momentum": FASTBN_OPTIM_MOMENTUM, "nesterov": FASTBN_OPTIM_NESTEROV,
         "centered": FASTBN_OPTIM_CENTERED, "amsgrad": FASTBN_OPTIM_AMSGRAD,
         "decoupled": FASTBN_OPTIM_DECOUPLED}
CHUNK = FASTBN_OPTIM_CHUNK

cdef enum:
    MAX_SCALARS = 8
    MAX_COEFFICIENTS = 2
    N_SLOTS = 3

cdef int REQUIRED_DATA_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED | cnp.NPY_ARRAY_WRITEABLE
cdef int REQUIRED_GRAD_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED


# section: tensor tables ------------------------------------------------------

cdef class _Tensors:
    """C arrays describing the tensors of one dtype: pointers, sizes, chunk
    offsets, per-tensor coefficients, plus Python references that keep every
    buffer alive while the GIL is released."""
    cdef void **param
    cdef const void **grad
    cdef void **state[N_SLOTS]
    cdef int64_t *size
    cdef int64_t *chunk_start
    cdef int64_t *position
    cdef double *coefficients
    cdef int64_t n, capacity, n_elements
    cdef list params
    cdef list arrays
    cdef list keepalive

    def __cinit__(self, int64_t capacity):
        cdef int slot
        self.capacity = capacity if capacity > 0 else 1
        self.n = 0
        self.n_elements = 0
        self.params = []
        self.arrays = []
        self.keepalive = []
        self.param = <void **>PyMem_Malloc(self.capacity * sizeof(void *))
        self.grad = <const void **>PyMem_Malloc(self.capacity * sizeof(void *))
        for slot in range(N_SLOTS):
            self.state[slot] = <void **>PyMem_Malloc(self.capacity * sizeof(void *))
        self.size = <int64_t *>PyMem_Malloc(self.capacity * sizeof(int64_t))
        self.chunk_start = <int64_t *>PyMem_Malloc((self.capacity + 1) * sizeof(int64_t))
        self.position = <int64_t *>PyMem_Malloc(self.capacity * sizeof(int64_t))
        self.coefficients = <double *>PyMem_Malloc(self.capacity * MAX_COEFFICIENTS * sizeof(double))
        if (not self.param or not self.grad or not self.state[0] or not self.state[1]
                or not self.state[2] or not self.size or not self.chunk_start
                or not self.position or not self.coefficients):
            raise MemoryError("optimizer step: could not allocate the tensor tables")
        self.chunk_start[0] = 0

    def __dealloc__(self):
        cdef int slot
        PyMem_Free(self.param)
        PyMem_Free(<void *>self.grad)
        for slot in range(N_SLOTS):
            PyMem_Free(self.state[slot])
        PyMem_Free(self.size)
        PyMem_Free(self.chunk_start)
        PyMem_Free(self.position)
        PyMem_Free(self.coefficients)

    cdef inline void add(self, object param, cnp.ndarray data, cnp.ndarray grad, int64_t position):
        cdef int64_t index = self.n
        cdef int64_t size = cnp.PyArray_SIZE(data)
        self.param[index] = cnp.PyArray_DATA(data)
        self.grad[index] = cnp.PyArray_DATA(grad)
        self.size[index] = size
        self.chunk_start[index + 1] = self.chunk_start[index] + fastbn_optim_chunks_of(size)
        self.position[index] = position
        self.n_elements += size
        self.n = index + 1
        self.params.append(param)
        self.arrays.append(data)
        self.keepalive.append(grad)

    cdef fastbn_optim_batch batch(self, int n_used_slots) noexcept:
        cdef fastbn_optim_batch batch
        cdef int slot
        batch.n_tensors = self.n
        batch.n_elements = self.n_elements
        batch.param = self.param
        batch.grad = self.grad
        for slot in range(N_SLOTS):
            batch.state[slot] = self.state[slot] if slot < n_used_slots else NULL
        batch.size = self.size
        batch.chunk_start = self.chunk_start
        batch.coefficients = self.coefficients
        batch.coefficient_stride = MAX_COEFFICIENTS
        return batch


cdef inline bint same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int ndim = cnp.PyArray_NDIM(a)
    cdef int axis
    if cnp.PyArray_NDIM(b) != ndim:
        return False
    for axis in range(ndim):
        if cnp.PyArray_DIMS(a)[axis] != cnp.PyArray_DIMS(b)[axis]:
            return False
    return True


cdef inline bint ready_for_kernel(object data, object grad) noexcept:
    """Both float32/float64 ndarrays of one dtype and shape, data writeable,
    both C-contiguous and aligned: the common case, checked without NumPy calls."""
    if not cnp.PyArray_Check(data) or not cnp.PyArray_Check(grad):
        return False
    cdef cnp.ndarray d = <cnp.ndarray>data
    cdef cnp.ndarray g = <cnp.ndarray>grad
    cdef int dtype = cnp.PyArray_TYPE(d)
    if dtype != cnp.NPY_FLOAT32 and dtype != cnp.NPY_FLOAT64:
        return False
    if cnp.PyArray_TYPE(g) != dtype or not cnp.PyArray_ISNOTSWAPPED(d) or not cnp.PyArray_ISNOTSWAPPED(g):
        return False
    if (cnp.PyArray_FLAGS(d) & REQUIRED_DATA_FLAGS) != REQUIRED_DATA_FLAGS:
        return False
    if (cnp.PyArray_FLAGS(g) & REQUIRED_GRAD_FLAGS) != REQUIRED_GRAD_FLAGS:
        return False
    return same_shape(d, g)


cdef inline bint usable_state(object value, cnp.ndarray data) noexcept:
    if not cnp.PyArray_Check(value):
        return False
    cdef cnp.ndarray array = <cnp.ndarray>value
    return (cnp.PyArray_TYPE(array) == cnp.PyArray_TYPE(data)
            and cnp.PyArray_ISNOTSWAPPED(array)
            and cnp.PyArray_SAMESHAPE(array, data)
            and (cnp.PyArray_FLAGS(array) & REQUIRED_DATA_FLAGS) == REQUIRED_DATA_FLAGS)


# section: one group's step ---------------------------------------------------

cdef class GroupPlan:
    """The kernel calls of one param group's step (see the module docstring)."""
    cdef int family, flags, group_index, n_scalars
    cdef double scalars[MAX_SCALARS]
    cdef _Tensors float32, float64
    cdef list step_owners
    cdef list new_steps

    def __init__(self, str family, list params, int group_index, tuple scalars, int flags):
        cdef Py_ssize_t n = len(params), position
        cdef object param, grad, data
        cdef int index
        if len(scalars) > MAX_SCALARS:
            raise ValueError(f"at most {MAX_SCALARS} group scalars, got {len(scalars)}")
        self.family = FAMILIES[family]
        self.flags = flags
        self.group_index = group_index
        self.n_scalars = len(scalars)
        for index in range(self.n_scalars):
            self.scalars[index] = scalars[index]
        self.float32 = _Tensors(n)
        self.float64 = _Tensors(n)
        self.step_owners = []
        self.new_steps = []
        for position in range(n):
            param = params[position]
            grad = param.grad
            if grad is None:
                continue
            data = param.data
            if not ready_for_kernel(data, grad):
                # raises the reference backend's message, or returns a usable copy
                grad = checked_grad(param, group_index, position)
                if not ready_for_kernel(data, grad):
                    raise ValueError(f"param_groups[{group_index}]['params'][{position}]: data or "
                                     "gradient is not an aligned native-endian array")
            if cnp.PyArray_TYPE(<cnp.ndarray>data) == cnp.NPY_FLOAT32:
                self.float32.add(param, <cnp.ndarray>data, <cnp.ndarray>grad, position)
            else:
                self.float64.add(param, <cnp.ndarray>data, <cnp.ndarray>grad, position)

    def bind_state(self, object state, tuple slots, bint counts_steps, object coefficients,
                   object ensure_state):
        """Find (or create through `ensure_state(param)`) the state of every
        parameter, point the slots at its arrays, and compute per-tensor
        coefficients with `coefficients(step, fresh)`, called again only when
        (step, fresh) changes from one tensor to the next."""
        cdef int n_slots = len(slots)
        if n_slots > N_SLOTS:
            raise ValueError(f"at most {N_SLOTS} state slots, got {n_slots}")
        if not isinstance(state, dict):
            raise TypeError(f"optimizer state: expected a dict, got {type(state).__name__}")
        self._bind(self.float32, state, slots, counts_steps, coefficients, ensure_state)
        self._bind(self.float64, state, slots, counts_steps, coefficients, ensure_state)

    cdef _bind(self, _Tensors tensors, object state, tuple slots, bint counts_steps,
               object coefficients, object ensure_state):
        cdef int64_t index
        cdef long long step = 0, last_step = -1
        cdef int slot, k, n_slots = len(slots), last_fresh = -1
        cdef object param, entry, key, row, step_object = None
        cdef PyObject *found
        cdef PyObject *values[N_SLOTS]
        cdef bint fresh
        cdef cnp.ndarray data
        cdef double last_row[MAX_COEFFICIENTS]
        cdef object step_key = "step"
        for index in range(tensors.n):
            param = tensors.params[index]
            data = <cnp.ndarray>tensors.arrays[index]
            fresh = False
            found = PyDict_GetItem(state, param)
            if found is NULL or not self._lookup(<object>found, slots, counts_steps, values):
                entry, fresh = ensure_state(param)
                self._lookup(entry, slots, counts_steps, values)
            else:
                entry = <object>found
            for slot in range(n_slots):
                if values[slot] is NULL:
                    tensors.state[slot][index] = NULL
                    continue
                if not usable_state(<object>values[slot], data):
                    self._raise_bad_state(slots[slot], <object>values[slot], data, tensors.position[index])
                tensors.state[slot][index] = cnp.PyArray_DATA(<cnp.ndarray>values[slot])
                tensors.keepalive.append(<object>values[slot])
            if counts_steps:
                step = PyLong_AsLongLong(<object>PyDict_GetItem(entry, step_key)) + 1
                if step != last_step:
                    step_object = PyLong_FromLongLong(step)
                self.step_owners.append(entry)
                self.new_steps.append(step_object)
            if coefficients is not None:
                if step != last_step or <int>fresh != last_fresh:
                    row = coefficients(step, fresh)
                    if len(row) > MAX_COEFFICIENTS:
                        raise ValueError(f"at most {MAX_COEFFICIENTS} coefficients, got {len(row)}")
                    for k in range(len(row)):
                        last_row[k] = row[k]
                    last_fresh = fresh
                for k in range(MAX_COEFFICIENTS):
                    tensors.coefficients[index * MAX_COEFFICIENTS + k] = last_row[k]
            last_step = step

    cdef bint _lookup(self, object entry, tuple slots, bint counts_steps, PyObject **values) except -1:
        """Fill values[slot] from the state dict `entry` (NULL for unused
        slots); False when a needed key is missing."""
        cdef int slot
        cdef object key
        if not isinstance(entry, dict):
            raise TypeError(f"optimizer state entry: expected a dict, got {type(entry).__name__}")
        if counts_steps and PyDict_GetItem(entry, "step") is NULL:
            return False
        for slot in range(len(slots)):
            key = slots[slot]
            if key is None:
                values[slot] = NULL
            else:
                values[slot] = PyDict_GetItem(entry, key)
                if values[slot] is NULL:
                    return False
        return True

    cdef _raise_bad_state(self, object key, object value, cnp.ndarray data, int64_t position):
        raise ValueError(
            f"optimizer state {key!r} of param_groups[{self.group_index}]['params'][{position}]: "
            f"expected an aligned C-contiguous writeable ndarray of dtype {data.dtype} and "
            f"shape {(<object>data).shape} (the parameter's), got {type(value).__name__}"
            + (f" of dtype {value.dtype} and shape {value.shape}" if isinstance(value, cnp.ndarray) else ""))

    def commit_and_run(self, int n_slots):
        """Write the new step counters, then update every tensor (GIL released)."""
        cdef Py_ssize_t index
        for index in range(len(self.step_owners)):
            (<dict>self.step_owners[index])["step"] = self.new_steps[index]
        cdef const fastbn_optim_kernels *table = fastbn_optim_kernels_for(current_simd_target())
        cdef int nt = effective_num_threads()
        cdef fastbn_optim_batch batch
        cdef fastbn_optim_step_fn kernel
        cdef int status = 0
        if self.float32.n:
            batch = self.float32.batch(n_slots)
            kernel = table.step_f32[self.family]
            with nogil:
                status = kernel(&batch, self.scalars, self.flags, nt)
            raise_for_status(status, "optimizer step (float32)")
        if self.float64.n:
            batch = self.float64.batch(n_slots)
            kernel = table.step_f64[self.family]
            with nogil:
                status = kernel(&batch, self.scalars, self.flags, nt)
            raise_for_status(status, "optimizer step (float64)")


# section: gradient clipping --------------------------------------------------

cdef _Tensors gradient_table(list grads, int dtype):
    """The gradients of one dtype, in the table's `param` slot (read and scaled)."""
    cdef _Tensors tensors = _Tensors(len(grads))
    cdef object grad
    cdef Py_ssize_t position
    for position in range(len(grads)):
        grad = grads[position]
        if cnp.PyArray_TYPE(<cnp.ndarray>grad) == dtype:
            tensors.add(None, <cnp.ndarray>grad, <cnp.ndarray>grad, position)
    return tensors


cdef double reduce_table(_Tensors tensors, bint largest, const fastbn_optim_kernels *table,
                         bint is_float32) except? -1.0:
    cdef fastbn_optim_batch batch = tensors.batch(0)
    cdef int64_t n_chunks = tensors.chunk_start[tensors.n]
    cdef double result = 0.0
    cdef int status = 0
    cdef int nt = effective_num_threads()
    if tensors.n == 0:
        return 0.0
    cdef double *partials = <double *>PyMem_Malloc((n_chunks if n_chunks > 0 else 1) * sizeof(double))
    if not partials:
        raise MemoryError("clip_grad_norm_: could not allocate the per-chunk partial sums")
    try:
        with nogil:
            if largest:
                status = (table.maxabs_f32 if is_float32 else table.maxabs_f64)(&batch, partials, &result, nt)
            else:
                status = (table.sumsq_f32 if is_float32 else table.sumsq_f64)(&batch, partials, &result, nt)
    finally:
        PyMem_Free(partials)
    raise_for_status(status, "gradient norm")
    return result


def grad_norm(list grads, bint inf_norm):
    """Global L2 norm (or max |g| when inf_norm) of C-contiguous float32/float64
    arrays: float64 partial sums per fixed chunk, added in chunk order, the
    float32 total before the float64 one."""
    cdef const fastbn_optim_kernels *table = fastbn_optim_kernels_for(current_simd_target())
    cdef double part32 = reduce_table(gradient_table(grads, cnp.NPY_FLOAT32), inf_norm, table, True)
    cdef double part64 = reduce_table(gradient_table(grads, cnp.NPY_FLOAT64), inf_norm, table, False)
    if inf_norm:
        if part32 != part32 or part64 != part64:
            return float("nan")
        return part32 if part32 > part64 else part64
    return sqrt(part32 + part64)


def scale_grads(list grads, double factor):
    """grads[i] *= factor in place (factor rounded to each array's dtype)."""
    cdef const fastbn_optim_kernels *table = fastbn_optim_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef _Tensors tensors
    cdef fastbn_optim_batch batch
    cdef int status = 0
    for dtype in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64):
        tensors = gradient_table(grads, dtype)
        if tensors.n == 0:
            continue
        batch = tensors.batch(0)
        with nogil:
            if dtype == cnp.NPY_FLOAT32:
                status = table.scale_f32(&batch, factor, nt)
            else:
                status = table.scale_f64(&batch, factor, nt)
        raise_for_status(status, "gradient scaling")
