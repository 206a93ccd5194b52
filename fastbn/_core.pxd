# Shared by every Cython bridge (cimport): the thread count and SIMD target a
# kernel call should use, decided in one place.
cdef int effective_num_threads() noexcept
cdef int current_simd_target() noexcept nogil
