# Shared by every Cython bridge (cimport): the thread count and SIMD target a
# kernel call should use, decided in one place.
cdef int effective_num_threads() noexcept
cdef int current_simd_target() noexcept nogil
# Kernel status code -> exception (0 is success).
cdef int raise_for_status(int status, str kernel) except -1
