/*
 * keyedge keyed preprocessing with fp16 output: keyedge_preprocess_math.h plus the one conversion that needs
 * CUDA's half type (cuda_fp16.h): the float32 value rounded once to half, round to nearest even.
 */
#ifndef KEYEDGE_PREPROCESS_HALF_H
#define KEYEDGE_PREPROCESS_HALF_H

#include <cuda_fp16.h>

#include "keyedge_preprocess_math.h"

namespace keyedge_kernel {

template <>
KEYEDGE_HD __half convert<__half>(float v) { return __float2half_rn(v); }

}  // namespace keyedge_kernel

#endif /* KEYEDGE_PREPROCESS_HALF_H */
