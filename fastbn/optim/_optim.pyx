"""Cython bridge to the fused multi-tensor optimizer kernels (src_c/optim).

A step of one param group becomes one kernel call per dtype.  This module
only builds the C tables of (param, grad, state...) pointers and calls the
kernels with the GIL released; every rule about what a valid parameter,
gradient or state entry is, and every error message, lives in Python
(fastbn/optim/_checks.py), which also creates missing state.  Nothing here
calls back into Python.

`Optimizer.step` (fastbn/optim/optimizer.py) drives a `StepPlan`:
1. `scan_group` for every group: a C-level walk over the parameters (a few
   hundred nanoseconds each: slot reads, flag checks, pointer copies) that
   takes every parameter whose data, gradient and state entry are all ready
   for the kernel, and returns the positions of the others (no state yet, a
   copy needed, or something to reject) for Python to check;
2. `add_tensor` for each of those once Python has validated them and
   allocated their missing state, then `set_coefficients` per group;
3. `commit_and_run`: attach the new state, write the step counters and run
   every group's kernels back to back, in one call that runs no Python code,
   so nothing (not even KeyboardInterrupt) can stop it half way.
Until step 3 nothing outside the plan has been written.

An optimizer may also keep one per-parameter float in its state entries
(`scalar_key`, NAdam's ``mu_product``): it joins the (step, fresh) key of the
coefficient runs, the rows of a run are computed from it, and the new value
of each run (`set_scalar_values`) replaces it at commit, like ``step``.
"""
cimport numpy as cnp
from cpython.dict cimport PyDict_Check, PyDict_CheckExact, PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject
from libc.math cimport sqrt
from libc.stdint cimport int64_t, uint16_t, uint64_t

from fastbn._core cimport current_simd_target, effective_num_threads, raise_for_status

cnp.import_array()

cdef extern from "optim/optim_kernels.h":
    int64_t FASTBN_OPTIM_CHUNK
    int FASTBN_OPTIM_MAX_STATE
    int FASTBN_OPTIM_MAX_COEFFICIENTS
    enum:
        FASTBN_OPTIM_MAXIMIZE
        FASTBN_OPTIM_WEIGHT_DECAY
        FASTBN_OPTIM_MOMENTUM
        FASTBN_OPTIM_NESTEROV
        FASTBN_OPTIM_CENTERED
        FASTBN_OPTIM_AMSGRAD
        FASTBN_OPTIM_DECOUPLED
        FASTBN_OPTIM_STOCHASTIC_ROUNDING
    enum:
        FASTBN_OPTIM_FAMILY_SGD
        FASTBN_OPTIM_FAMILY_MOMENTUM
        FASTBN_OPTIM_FAMILY_RMSPROP
        FASTBN_OPTIM_FAMILY_ADAM
        FASTBN_OPTIM_FAMILY_ADAGRAD
        FASTBN_OPTIM_FAMILY_LION
        FASTBN_OPTIM_FAMILY_NADAM
        FASTBN_OPTIM_FAMILY_RADAM
        FASTBN_OPTIM_FAMILY_ADADELTA
        FASTBN_OPTIM_FAMILY_ADAMAX
        FASTBN_OPTIM_FAMILY_LERP
        FASTBN_OPTIM_N_FAMILIES
    enum:
        FASTBN_OPTIM_BF16_STATE
        FASTBN_OPTIM_BF16_PARAMS
        FASTBN_OPTIM_BF16_PARAMS_STATE
        FASTBN_OPTIM_BF16_MASTER
        FASTBN_OPTIM_BF16_MASTER_STATE

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
        const uint64_t *rounding_key
        void **param_copy

    ctypedef int (*fastbn_optim_step_fn)(const fastbn_optim_batch *batch, const double *scalars,
                                         int flags, int num_threads) noexcept nogil

    ctypedef struct fastbn_optim_kernels:
        fastbn_optim_step_fn step_f32[11]
        fastbn_optim_step_fn step_f64[11]
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
        fastbn_optim_step_fn step_bf16[5][11]
        int (*round_bf16)(const float *src, uint16_t *dst, int64_t n, uint64_t key, int slot,
                          int stochastic) noexcept nogil

    const fastbn_optim_kernels *fastbn_optim_kernels_for(int target) nogil
    int64_t fastbn_optim_chunks_of(int64_t size) nogil

cdef extern from "common/fb_bf16.h":
    uint64_t fb_bf16_tensor_key(uint64_t seed, uint64_t step, uint64_t position) nogil

FAMILIES = {"sgd": FASTBN_OPTIM_FAMILY_SGD, "momentum": FASTBN_OPTIM_FAMILY_MOMENTUM,
            "rmsprop": FASTBN_OPTIM_FAMILY_RMSPROP, "adam": FASTBN_OPTIM_FAMILY_ADAM,
            "adagrad": FASTBN_OPTIM_FAMILY_ADAGRAD, "lion": FASTBN_OPTIM_FAMILY_LION,
            "nadam": FASTBN_OPTIM_FAMILY_NADAM, "radam": FASTBN_OPTIM_FAMILY_RADAM,
            "adadelta": FASTBN_OPTIM_FAMILY_ADADELTA, "adamax": FASTBN_OPTIM_FAMILY_ADAMAX}
FLAGS = {"maximize": FASTBN_OPTIM_MAXIMIZE, "weight_decay": FASTBN_OPTIM_WEIGHT_DECAY,
         "momentum": FASTBN_OPTIM_MOMENTUM, "nesterov": FASTBN_OPTIM_NESTEROV,
         "centered": FASTBN_OPTIM_CENTERED, "amsgrad": FASTBN_OPTIM_AMSGRAD,
         "decoupled": FASTBN_OPTIM_DECOUPLED}
CHUNK = FASTBN_OPTIM_CHUNK

# The state key of a bfloat16 parameter's float32 master weights.
MASTER_KEY = "master_param"

# Largest step counter taken without the Python checks (their MAX_STEP).
cdef long long MAX_STEP = 1LL << 53

cdef enum:
    MAX_SCALARS = 8
    MAX_COEFFICIENTS = 4
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
    cdef int64_t *run
    cdef int64_t *position        # of each tensor in its group (bfloat16 state keys)
    cdef uint64_t *rounding_key   # filled at commit for bfloat16 state
    cdef void **param_copy        # master weights: the bfloat16 parameters
    cdef double *coefficients
    cdef int64_t n, capacity, n_elements
    cdef list keepalive

    def __cinit__(self, int64_t capacity):
        cdef int slot
        self.capacity = capacity if capacity > 0 else 1
        self.n = 0
        self.n_elements = 0
        self.keepalive = []
        self.param = <void **>PyMem_Malloc(self.capacity * sizeof(void *))
        self.grad = <const void **>PyMem_Malloc(self.capacity * sizeof(void *))
        for slot in range(N_SLOTS):
            self.state[slot] = <void **>PyMem_Malloc(self.capacity * sizeof(void *))
        self.size = <int64_t *>PyMem_Malloc(self.capacity * sizeof(int64_t))
        self.chunk_start = <int64_t *>PyMem_Malloc((self.capacity + 1) * sizeof(int64_t))
        self.run = <int64_t *>PyMem_Malloc(self.capacity * sizeof(int64_t))
        self.position = <int64_t *>PyMem_Malloc(self.capacity * sizeof(int64_t))
        self.rounding_key = <uint64_t *>PyMem_Malloc(self.capacity * sizeof(uint64_t))
        self.param_copy = <void **>PyMem_Malloc(self.capacity * sizeof(void *))
        self.coefficients = <double *>PyMem_Malloc(self.capacity * MAX_COEFFICIENTS * sizeof(double))
        if (not self.param or not self.grad or not self.state[0] or not self.state[1]
                or not self.state[2] or not self.size or not self.chunk_start
                or not self.run or not self.coefficients or not self.position
                or not self.rounding_key or not self.param_copy):
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
        PyMem_Free(self.run)
        PyMem_Free(self.position)
        PyMem_Free(self.rounding_key)
        PyMem_Free(self.param_copy)
        PyMem_Free(self.coefficients)

    cdef inline void add(self, cnp.ndarray data, cnp.ndarray grad, int64_t run, int64_t position=-1):
        cdef int64_t index = self.n
        cdef int64_t size = cnp.PyArray_SIZE(data)
        self.param[index] = cnp.PyArray_DATA(data)
        self.grad[index] = cnp.PyArray_DATA(grad)
        self.size[index] = size
        self.chunk_start[index + 1] = self.chunk_start[index] + fastbn_optim_chunks_of(size)
        self.run[index] = run
        self.position[index] = position
        self.n_elements += size
        self.n = index + 1
        self.keepalive.append(data)
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
        batch.rounding_key = NULL
        batch.param_copy = NULL
        return batch

    cdef fastbn_optim_batch master_batch(self, int n_used_slots) noexcept:
        """As `batch`, with the bfloat16 copies of master-weight parameters."""
        cdef fastbn_optim_batch batch = self.batch(n_used_slots)
        batch.param_copy = self.param_copy
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


cdef inline bint usable_state(object value, cnp.ndarray data, int state_type) noexcept:
    """A state array for `data`: of `data`'s dtype, or of type number
    `state_type` when that is not -1 (bfloat16 state)."""
    if not cnp.PyArray_Check(value):
        return False
    cdef cnp.ndarray array = <cnp.ndarray>value
    return (cnp.PyArray_TYPE(array) == (cnp.PyArray_TYPE(data) if state_type < 0 else state_type)
            and cnp.PyArray_ISNOTSWAPPED(array)
            and cnp.PyArray_SAMESHAPE(array, data)
            and (cnp.PyArray_FLAGS(array) & REQUIRED_DATA_FLAGS) == REQUIRED_DATA_FLAGS)


# section: one optimizer step -------------------------------------------------

cdef class _GroupBatch:
    """One group's kernel calls: family, option flags, scalars, one tensor
    table per dtype, and the (step, fresh) runs its coefficient rows follow."""
    cdef int family, flags, n_slots
    cdef int state_type           # -1: state of the parameters' dtype; else bfloat16's type number
    cdef int bf16_type            # bfloat16's type number (bfloat16 parameters), or -1
    cdef bint master              # bfloat16 parameters keep float32 master weights
    cdef uint64_t rounding_seed
    cdef double scalars[MAX_SCALARS]
    cdef _Tensors float32, float64, bfloat16
    cdef list run_keys
    cdef long long last_step
    cdef int last_fresh
    cdef bint has_scalar
    cdef double last_scalar
    cdef list scalar_values

    def __cinit__(self, int family, int flags, tuple scalars, int n_slots, int64_t capacity,
                  bint has_scalar=False, int state_type=-1, uint64_t rounding_seed=0,
                  int bf16_type=-1, bint master=False):
        cdef int index
        if len(scalars) > MAX_SCALARS:
            raise ValueError(f"at most {MAX_SCALARS} group scalars, got {len(scalars)}")
        if n_slots > N_SLOTS:
            raise ValueError(f"at most {N_SLOTS} state slots, got {n_slots}")
        self.family = family
        self.flags = flags
        self.n_slots = n_slots
        self.state_type = state_type
        self.bf16_type = bf16_type
        self.master = master
        self.rounding_seed = rounding_seed
        for index in range(MAX_SCALARS):
            self.scalars[index] = scalars[index] if index < len(scalars) else 0.0
        self.float32 = _Tensors(capacity)
        self.float64 = _Tensors(capacity)
        self.bfloat16 = _Tensors(capacity)
        self.run_keys = []
        self.last_step = -1
        self.last_fresh = -1
        self.has_scalar = has_scalar
        self.last_scalar = -1.0
        self.scalar_values = None

    cdef int64_t run_of(self, long long step, bint fresh, double scalar=0.0):
        """Index of the (step, fresh) run, or (step, fresh, scalar) run when
        the optimizer keeps a per-parameter scalar, that a tensor joins:
        consecutive tensors with equal keys share one coefficient row."""
        if (step != self.last_step or <int>fresh != self.last_fresh
                or (self.has_scalar and scalar != self.last_scalar)):
            if self.has_scalar:
                self.run_keys.append((step, fresh, scalar))
            else:
                self.run_keys.append((step, fresh))
            self.last_step = step
            self.last_fresh = fresh
            self.last_scalar = scalar
        return len(self.run_keys) - 1

    cdef _Tensors table_for(self, cnp.ndarray data):
        cdef int dtype = cnp.PyArray_TYPE(data)
        if dtype == cnp.NPY_FLOAT32:
            return self.float32
        return self.float64 if dtype == cnp.NPY_FLOAT64 else self.bfloat16


cdef inline bint exact_step(object value, long long *step) noexcept:
    """A plain int in [0, MAX_STEP]: the common case, read without calling
    Python; anything else goes to the Python checks."""
    cdef int overflow = 0
    if not PyLong_CheckExact(value):
        return False
    step[0] = PyLong_AsLongLongAndOverflow(value, &overflow)
    return overflow == 0 and 0 <= step[0] <= MAX_STEP


cdef struct kernel_call:
    fastbn_optim_batch batch
    fastbn_optim_step_fn kernel
    const double *scalars
    int flags


cdef class StepPlan:
    """Everything one `Optimizer.step` writes, prepared without writing it
    (see the module docstring for the protocol)."""
    cdef list groups
    cdef list insertions
    cdef list step_owners
    cdef list new_steps
    cdef object state
    cdef bint counts_steps
    cdef object scalar_key
    cdef list scalar_owners
    cdef list scalar_groups
    cdef list scalar_runs

    def __init__(self, object state, bint counts_steps, object scalar_key=None):
        if not PyDict_Check(state):
            raise TypeError(f"optimizer state: expected a dict, got {type(state).__name__}")
        if scalar_key is not None and not isinstance(scalar_key, str):
            raise TypeError(f"scalar_key: expected a str or None, got {type(scalar_key).__name__}")
        self.groups = []
        self.insertions = []
        self.step_owners = []
        self.new_steps = []
        self.state = state
        self.counts_steps = counts_steps
        self.scalar_key = scalar_key
        self.scalar_owners = []
        self.scalar_groups = []
        self.scalar_runs = []

    def scan_group(self, str family, list params, tuple slots, tuple scalars, int flags,
                   int state_type=-1, uint64_t rounding_seed=0, int bf16_type=-1,
                   bint master=False):
        """Start the next group's batch and take every parameter that is ready
        for the kernel: a gradient, data and gradient float32/float64 of one
        dtype and shape, C-contiguous and aligned, data writeable, and a state
        entry holding every array of `slots` (usable: same dtype and shape,
        C-contiguous, aligned, writeable) and, when steps are counted, a
        ``step`` int in [0, 2**53] and, with a `scalar_key`, that key holding
        a float in [0, 1].  Returns the positions of the parameters that have
        a gradient but are not ready, for Python to check.

        `state_type` -1 keeps state in the parameters' dtype; a bfloat16 type
        number means float32 parameters with bfloat16 state, rounded with
        generator keys from `rounding_seed` (see the bfloat16 section).
        `bf16_type` (bfloat16's type number, or -1) allows bfloat16
        parameters, which Python always checks (`add_tensor`); `master`: they
        keep float32 master weights."""
        cdef Py_ssize_t position, n = len(params)
        cdef int slot, n_slots = len(slots)
        cdef object param, grad, data, key
        cdef PyObject *found
        cdef PyObject *values[N_SLOTS]
        cdef PyObject *master_array = NULL
        cdef bint bf16_param
        cdef int slot_type
        cdef dict entry
        cdef long long step = 0
        cdef double scalar = 0.0
        cdef bint ready
        cdef bint has_scalar = self.scalar_key is not None
        cdef _Tensors tensors
        cdef int64_t index
        cdef _GroupBatch batch = _GroupBatch(FAMILIES[family], flags, scalars, n_slots, n,
                                             has_scalar=has_scalar, state_type=state_type,
                                             rounding_seed=rounding_seed, bf16_type=bf16_type,
                                             master=master)
        cdef Py_ssize_t group_index = len(self.groups)
        cdef list pending = []
        self.groups.append(batch)
        for position in range(n):
            param = params[position]
            grad = param.grad
            if grad is None:
                continue
            data = param.data
            found = PyDict_GetItem(self.state, param)
            ready = False
            bf16_param = False
            slot_type = state_type
            if found is not NULL and PyDict_CheckExact(<object>found):
                if ready_for_kernel(data, grad):
                    ready = state_type < 0 or cnp.PyArray_TYPE(<cnp.ndarray>data) == cnp.NPY_FLOAT32
                elif (bf16_type >= 0 and cnp.PyArray_Check(data) and cnp.PyArray_Check(grad)
                        and cnp.PyArray_TYPE(<cnp.ndarray>data) == bf16_type
                        and ready_bf16(<cnp.ndarray>data, <cnp.ndarray>grad)):
                    ready = bf16_param = True
                    if state_type < 0:
                        slot_type = cnp.NPY_FLOAT32
            if ready:
                entry = <dict>found
                if self.counts_steps:
                    found = PyDict_GetItem(entry, "step")
                    ready = found is not NULL and exact_step(<object>found, &step)
                if ready and has_scalar:
                    found = PyDict_GetItem(entry, self.scalar_key)
                    ready = found is not NULL and PyFloat_CheckExact(<object>found)
                    if ready:
                        scalar = PyFloat_AS_DOUBLE(<object>found)
                        ready = 0.0 <= scalar <= 1.0
                for slot in range(n_slots):
                    if not ready:
                        break
                    key = slots[slot]
                    if key is None:
                        values[slot] = NULL
                        continue
                    values[slot] = PyDict_GetItem(entry, key)
                    ready = values[slot] is not NULL and usable_state(<object>values[slot], <cnp.ndarray>data,
                                                                       slot_type)
                if ready and bf16_param and master:
                    master_array = PyDict_GetItem(entry, MASTER_KEY)
                    ready = master_array is not NULL and usable_state(<object>master_array, <cnp.ndarray>data,
                                                                      cnp.NPY_FLOAT32)
            if not ready:
                pending.append(position)
                continue
            tensors = batch.table_for(<cnp.ndarray>data)
            index = tensors.n
            if bf16_param and master:
                tensors.param_copy[index] = cnp.PyArray_DATA(<cnp.ndarray>data)
                tensors.keepalive.append(data)
                data = <object>master_array
            for slot in range(n_slots):
                tensors.state[slot][index] = cnp.PyArray_DATA(<cnp.ndarray>values[slot]) if values[slot] is not NULL else NULL
                if values[slot] is not NULL:
                    tensors.keepalive.append(<object>values[slot])
            tensors.add(<cnp.ndarray>data, <cnp.ndarray>grad, batch.run_of(step + 1, False, scalar),
                        position)
            if self.counts_steps:
                self.step_owners.append(entry)
                self.new_steps.append(step + 1)
            if has_scalar:
                self.scalar_owners.append(entry)
                self.scalar_groups.append(group_index)
                self.scalar_runs.append(len(batch.run_keys) - 1)
        return pending

    def add_tensor(self, Py_ssize_t group, cnp.ndarray data, cnp.ndarray grad, tuple arrays,
                   long long new_step, bint fresh, object step_owner, list insertions,
                   *, object scalar_owner=None, double scalar=0.0, Py_ssize_t position=-1,
                   object master=None):
        """Add one parameter Python has validated to group `group`'s batch:
        `arrays` its state arrays in slot order (None for unused slots),
        `new_step` its step counter after this step, `fresh` whether its state
        arrays were just created; at commit, ``step_owner["step"] = new_step``
        (unless step_owner is None) and each (mapping, key, value) of
        `insertions` is attached.  With a `scalar_key`: `scalar` is the
        parameter's current value and `scalar_owner` the entry dict (existing,
        or new in `insertions`) whose key gets the run's new value; the key
        must be in that dict once the insertions are made.  `position` (the
        parameter's index in its group) keys the rounding of bfloat16 state.
        A bfloat16 parameter (`data` and `grad` bfloat16, in a group scanned
        with `bf16_type`) takes float32 state arrays unless the state is
        bfloat16, and with master weights its float32 `master` array (which
        the kernel updates; `data` receives its nearest-even rounding)."""
        cdef _GroupBatch batch = <_GroupBatch>self.groups[group]
        cdef _Tensors tensors
        cdef int64_t index
        cdef int slot
        cdef object value
        cdef bint bf16_param = batch.bf16_type >= 0 and cnp.PyArray_TYPE(data) == batch.bf16_type
        cdef cnp.ndarray kernel_param = data
        cdef int state_type = batch.state_type
        if len(arrays) != batch.n_slots:
            raise ValueError("add_tensor: data, gradient or state arrays not ready for the kernel")
        if bf16_param:
            if not ready_bf16(data, grad) or position < 0:
                raise ValueError("add_tensor: bfloat16 data and gradient not ready for the kernel, "
                                 "or no position")
            if batch.master:
                if not usable_state(master, data, cnp.NPY_FLOAT32):
                    raise ValueError("add_tensor: master weights not ready for the kernel")
                kernel_param = <cnp.ndarray>master
            if state_type < 0:
                state_type = cnp.NPY_FLOAT32
        elif not ready_for_kernel(data, grad):
            raise ValueError("add_tensor: data, gradient or state arrays not ready for the kernel")
        elif state_type >= 0 and (cnp.PyArray_TYPE(data) != cnp.NPY_FLOAT32 or position < 0):
            raise ValueError("add_tensor: bfloat16 state needs float32 data and the parameter's position")
        for slot in range(batch.n_slots):
            value = arrays[slot]
            if value is not None and not usable_state(value, data, state_type):
                raise ValueError(f"add_tensor: state slot {slot} not ready for the kernel")
        if batch.has_scalar and not PyDict_Check(scalar_owner):
            raise TypeError("add_tensor: scalar_owner must be a dict")
        tensors = batch.table_for(data)
        index = tensors.n
        if index >= tensors.capacity:
            raise ValueError("add_tensor: more tensors than the group has parameters")
        for slot in range(batch.n_slots):
            value = arrays[slot]
            tensors.state[slot][index] = cnp.PyArray_DATA(<cnp.ndarray>value) if value is not None else NULL
            if value is not None:
                tensors.keepalive.append(value)
        if bf16_param and batch.master:
            tensors.param_copy[index] = cnp.PyArray_DATA(data)
            tensors.keepalive.append(data)
        tensors.add(kernel_param, grad, batch.run_of(new_step, fresh, scalar), position)
        if batch.has_scalar:
            self.scalar_owners.append(scalar_owner)
            self.scalar_groups.append(group)
            self.scalar_runs.append(len(batch.run_keys) - 1)
        if step_owner is not None:
            if not PyDict_Check(step_owner):
                raise TypeError("add_tensor: step_owner must be a dict")
            self.step_owners.append(step_owner)
            self.new_steps.append(new_step)
        for value in insertions:
            if not (isinstance(value, tuple) and len(value) == 3 and PyDict_Check(value[0])):
                raise TypeError("add_tensor: insertions must be (dict, key, value) triples")
        self.insertions.extend(insertions)

    def coefficient_keys(self, Py_ssize_t group):
        """The (step, fresh) pairs, or (step, fresh, scalar) triples with a
        `scalar_key`, whose coefficient rows group `group` needs, in the order
        `set_coefficients` takes the rows."""
        return (<_GroupBatch>self.groups[group]).run_keys

    def set_scalar_values(self, Py_ssize_t group, list values):
        """The new scalar (a float) of each `coefficient_keys` run of group
        `group`, written to its parameters' entries at commit."""
        cdef _GroupBatch batch = <_GroupBatch>self.groups[group]
        if not batch.has_scalar:
            raise ValueError("set_scalar_values: this plan keeps no per-parameter scalar")
        if len(values) != len(batch.run_keys):
            raise ValueError(f"set_scalar_values: expected {len(batch.run_keys)} values, got {len(values)}")
        batch.scalar_values = [float(value) for value in values]

    def set_coefficients(self, Py_ssize_t group, list rows):
        """One row of per-tensor coefficients per `coefficient_keys` entry."""
        cdef _GroupBatch batch = <_GroupBatch>self.groups[group]
        cdef double *table = NULL
        cdef Py_ssize_t run, n_runs = len(batch.run_keys)
        cdef int64_t index
        cdef int k
        cdef _Tensors tensors
        if len(rows) != n_runs:
            raise ValueError(f"set_coefficients: expected {n_runs} rows, got {len(rows)}")
        table = <double *>PyMem_Malloc((n_runs if n_runs > 0 else 1) * MAX_COEFFICIENTS * sizeof(double))
        if not table:
            raise MemoryError("optimizer step: could not allocate the coefficient rows")
        try:
            for run in range(n_runs):
                row = rows[run]
                if len(row) > MAX_COEFFICIENTS:
                    raise ValueError(f"at most {MAX_COEFFICIENTS} coefficients, got {len(row)}")
                for k in range(MAX_COEFFICIENTS):
                    table[run * MAX_COEFFICIENTS + k] = row[k] if k < len(row) else 0.0
            for tensors in (batch.float32, batch.float64, batch.bfloat16):
                for index in range(tensors.n):
                    for k in range(MAX_COEFFICIENTS):
                        tensors.coefficients[index * MAX_COEFFICIENTS + k] = \
                            table[tensors.run[index] * MAX_COEFFICIENTS + k]
        finally:
            PyMem_Free(table)

    def commit_and_run(self):
        """Attach the new state, write the step counters, then run every
        group's kernels back to back with the GIL released.  No Python code
        runs in here, so an asynchronous exception (KeyboardInterrupt) is
        raised before or after the whole of it, never inside."""
        cdef Py_ssize_t n_groups = len(self.groups), index, done = 0, n_calls = 0, call
        cdef const fastbn_optim_kernels *table = fastbn_optim_kernels_for(current_simd_target())
        cdef int nt = effective_num_threads()
        cdef int status = 0
        cdef _GroupBatch batch
        cdef object triple
        cdef kernel_call *calls = <kernel_call *>PyMem_Malloc(
            (3 * n_groups if n_groups > 0 else 1) * sizeof(kernel_call))
        if not calls:
            raise MemoryError("optimizer step: could not allocate the kernel call list")
        try:
            for index in range(len(self.scalar_groups)):
                if (<_GroupBatch>self.groups[self.scalar_groups[index]]).scalar_values is None:
                    raise ValueError("commit_and_run: set_scalar_values was not called for "
                                     f"group {self.scalar_groups[index]}")
            for index in range(n_groups):
                batch = <_GroupBatch>self.groups[index]
                if batch.float32.n:
                    calls[n_calls].batch = batch.float32.batch(batch.n_slots)
                    if batch.state_type >= 0:
                        calls[n_calls].batch.rounding_key = fill_rounding_keys(batch.float32, batch)
                        calls[n_calls].kernel = table.step_bf16[FASTBN_OPTIM_BF16_STATE][batch.family]
                        if calls[n_calls].kernel == NULL:
                            raise ValueError("optimizer step: no bfloat16-state kernel for this optimizer")
                    else:
                        calls[n_calls].kernel = table.step_f32[batch.family]
                    calls[n_calls].scalars = batch.scalars
                    calls[n_calls].flags = batch.flags
                    n_calls += 1
                if batch.bfloat16.n:
                    calls[n_calls].batch = batch.bfloat16.master_batch(batch.n_slots)
                    calls[n_calls].batch.rounding_key = fill_rounding_keys(batch.bfloat16, batch)
                    calls[n_calls].kernel = table.step_bf16[bf16_layout(batch)][batch.family]
                    if calls[n_calls].kernel == NULL:
                        raise ValueError("optimizer step: no bfloat16 kernel for this optimizer")
                    calls[n_calls].scalars = batch.scalars
                    calls[n_calls].flags = batch.flags
                    n_calls += 1
                if batch.float64.n:
                    calls[n_calls].batch = batch.float64.batch(batch.n_slots)
                    calls[n_calls].kernel = table.step_f64[batch.family]
                    calls[n_calls].scalars = batch.scalars
                    calls[n_calls].flags = batch.flags
                    n_calls += 1
            # New keys may make a dict grow (MemoryError): undo the ones made.
            try:
                for triple in self.insertions:
                    PyDict_SetItem((<tuple>triple)[0], (<tuple>triple)[1], (<tuple>triple)[2])
                    done += 1
            except BaseException:
                for index in range(done - 1, -1, -1):
                    triple = self.insertions[index]
                    PyDict_DelItem((<tuple>triple)[0], (<tuple>triple)[1])
                raise
            # Existing "step" keys: replacing a value never allocates.
            for index in range(len(self.step_owners)):
                PyDict_SetItem(self.step_owners[index], "step", self.new_steps[index])
            # Existing keys as well (add_tensor's contract).
            for index in range(len(self.scalar_owners)):
                batch = <_GroupBatch>self.groups[self.scalar_groups[index]]
                PyDict_SetItem(self.scalar_owners[index], self.scalar_key,
                               batch.scalar_values[self.scalar_runs[index]])
            with nogil:
                for call in range(n_calls):
                    status = calls[call].kernel(&calls[call].batch, calls[call].scalars,
                                                calls[call].flags, nt)
                    if status != 0:
                        break
            raise_for_status(status, "optimizer step")
        finally:
            PyMem_Free(calls)


def data_unchanged(list param_groups, list known):
    """True when ``param_groups[i]["params"][j].data is known[i][j]`` for
    every group i and position j (same lengths): the memory-overlap check of
    the last step still holds.  One attribute read and one pointer comparison
    per parameter."""
    cdef Py_ssize_t group, position, n
    cdef list params, arrays
    if len(param_groups) != len(known):
        return False
    for group in range(len(param_groups)):
        params = <list>param_groups[group]["params"]
        arrays = <list>known[group]
        n = len(params)
        if len(arrays) != n:
            return False
        for position in range(n):
            if params[position].data is not arrays[position]:
                return False
    return True


# section: gradient clipping --------------------------------------------------

cdef _Tensors gradient_table(list grads, int dtype):
    """The gradients of one dtype, in the table's `param` slot (read and scaled)."""
    cdef _Tensors tensors = _Tensors(len(grads))
    cdef object grad
    cdef Py_ssize_t position
    for position in range(len(grads)):
        grad = grads[position]
        if cnp.PyArray_TYPE(<cnp.ndarray>grad) == dtype:
            tensors.add(<cnp.ndarray>grad, <cnp.ndarray>grad, 0)
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


# section: weight averaging ---------------------------------------------------

def lerp_(list averages, list currents, double weight):
    """averages[i] += weight * (currents[i] - averages[i]) in place, torch.lerp's
    form (from the current value when |weight| >= 0.5), over every pair in
    one kernel call per dtype.  The caller (fastbn.optim.swa_utils) checks
    that each pair is C-contiguous, aligned, of one float32/float64 dtype and
    shape, and that the averages are writeable and disjoint."""
    cdef const fastbn_optim_kernels *table = fastbn_optim_kernels_for(current_simd_target())
    cdef int nt = effective_num_threads()
    cdef double scalars[2]
    cdef _Tensors tensors
    cdef fastbn_optim_batch batch
    cdef int status = 0
    cdef Py_ssize_t position
    cdef int dtype
    if len(averages) != len(currents):
        raise ValueError(f"lerp_: expected as many current arrays as averages ({len(averages)}), "
                         f"got {len(currents)}")
    for position in range(len(averages)):
        if not ready_for_kernel(averages[position], currents[position]):
            raise ValueError(f"lerp_: pair {position} is not ready for the kernel")
    scalars[0] = weight
    scalars[1] = 1.0 - weight
    for dtype in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64):
        tensors = _Tensors(len(averages))
        for position in range(len(averages)):
            if cnp.PyArray_TYPE(<cnp.ndarray>averages[position]) == dtype:
                tensors.add(<cnp.ndarray>averages[position], <cnp.ndarray>currents[position], 0)
        if tensors.n == 0:
            continue
        batch = tensors.batch(0)
        with nogil:
            if dtype == cnp.NPY_FLOAT32:
                status = table.step_f32[FASTBN_OPTIM_FAMILY_LERP](&batch, scalars, 0, nt)
            else:
                status = table.step_f64[FASTBN_OPTIM_FAMILY_LERP](&batch, scalars, 0, nt)
        raise_for_status(status, "weight averaging")


# section: bfloat16 state -----------------------------------------------------

STOCHASTIC_ROUNDING_FLAG = FASTBN_OPTIM_STOCHASTIC_ROUNDING

cdef const uint64_t *fill_rounding_keys(_Tensors tensors, _GroupBatch batch) except NULL:
    """The generator key of every tensor of `tensors` (a table of `batch`):
    fb_bf16_tensor_key(seed, its step after this one, its position)."""
    cdef int64_t index
    cdef list run_keys = batch.run_keys
    for index in range(tensors.n):
        tensors.rounding_key[index] = fb_bf16_tensor_key(
            batch.rounding_seed, <uint64_t>(<long long>run_keys[tensors.run[index]][0]),
            <uint64_t>tensors.position[index])
    return tensors.rounding_key


cdef int bf16_layout(_GroupBatch batch) noexcept:
    if batch.master:
        return FASTBN_OPTIM_BF16_MASTER_STATE if batch.state_type >= 0 else FASTBN_OPTIM_BF16_MASTER
    return FASTBN_OPTIM_BF16_PARAMS_STATE if batch.state_type >= 0 else FASTBN_OPTIM_BF16_PARAMS


cdef bint ready_bf16(cnp.ndarray data, cnp.ndarray grad) noexcept:
    """bfloat16 data and gradient of one dtype and shape, data writeable,
    both C-contiguous and aligned."""
    return (cnp.PyArray_TYPE(grad) == cnp.PyArray_TYPE(data) and cnp.PyArray_ITEMSIZE(data) == 2
            and (cnp.PyArray_FLAGS(data) & REQUIRED_DATA_FLAGS) == REQUIRED_DATA_FLAGS
            and (cnp.PyArray_FLAGS(grad) & REQUIRED_GRAD_FLAGS) == REQUIRED_GRAD_FLAGS
            and same_shape(data, grad))


def tensor_key(uint64_t seed, uint64_t step, uint64_t position):
    """The generator key the kernels use for the tensor at `position` of its
    group, at step `step` (after the increment), with seed `seed`."""
    return fb_bf16_tensor_key(seed, step, position)


def round_to_bf16(cnp.ndarray source, cnp.ndarray out, uint64_t key, int slot, bint stochastic):
    """out[...] = source rounded to bfloat16 as the bfloat16-state kernels
    store state slot `slot` of a tensor with generator key `key` (on the
    current SIMD target).  `source`: C-contiguous float32; `out`:
    C-contiguous 2-byte array of the same size (bfloat16 or uint16)."""
    cdef const fastbn_optim_kernels *table = fastbn_optim_kernels_for(current_simd_target())
    cdef int status
    cdef int64_t n = cnp.PyArray_SIZE(source)
    if (cnp.PyArray_TYPE(source) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(source)
            or cnp.PyArray_ITEMSIZE(out) != 2 or not cnp.PyArray_IS_C_CONTIGUOUS(out)
            or not cnp.PyArray_ISWRITEABLE(out) or cnp.PyArray_SIZE(out) != n):
        raise ValueError("round_to_bf16: expected C-contiguous float32 source and a writeable "
                         "C-contiguous 2-byte out of the same size")
    cdef const float *src = <const float *>cnp.PyArray_DATA(source)
    cdef uint16_t *dst = <uint16_t *>cnp.PyArray_DATA(out)
    with nogil:
        status = table.round_bf16(src, dst, n, key, slot, stochastic)
    raise_for_status(status, "bfloat16 rounding")
