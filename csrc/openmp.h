// OpenMP's thread queries, or their one-thread answers where the compiler has no OpenMP (the pragmas
// are then ignored and every parallel region runs on the calling thread).
#pragma once

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif
