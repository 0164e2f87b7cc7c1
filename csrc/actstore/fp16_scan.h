// The fp16 overflow scan of `actstore._native` (plain C++; bindings.cpp exposes it to Python).
#pragma once
#include <cstdint>

namespace actstore_native {

// Flat index of the first of the n floats that float16 cannot hold (|x| > 65504, inf, NaN),
// or -1 if every value fits. OpenMP-parallel when built with ACTSTORE_OPENMP.
int64_t find_fp16_overflow(const float *x, int64_t n);

}  // namespace actstore_native
