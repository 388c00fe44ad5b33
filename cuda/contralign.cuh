// Included first by every kernel file. Under nvcc it brings in the CUDA headers the kernels
// use; under the host C++ compiler it brings in the emulator (cuda/emu/, see README.md), so
// that the same source runs on a GPU and on the CPU.
//
// Every kernel is `extern "C" __global__` (an unmangled name to look up in the PTX) and is
// followed, at the start of a line, by `CONTRALIGN_KERNEL(name)`: build.rs collects those
// lines into the tables of launchable kernels, and the emulator turns each into a C entry
// point. Under nvcc the macro expands to nothing.
#pragma once

#ifdef __CUDACC__
#include <cassert>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define CONTRALIGN_KERNEL(name)
#else
#include "emu/cuda_emu.h"
#endif

// Element conversions shared by kernels that are templates over their storage type: values
// are loaded into fp32, computed in fp32 and rounded once when stored (design.md, Precision).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
