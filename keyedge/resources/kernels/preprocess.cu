// keyedge fused keyed preprocessing kernel (see include/keyedge_preprocess.h).
#include "keyedge_preprocess.h"

#include <cuda_fp16.h>

#include <cstdio>

namespace {

thread_local char g_error[256] = "no error";

int fail(int code, const char* message) {
    std::snprintf(g_error, sizeof(g_error), "%s", message);
    return code;
}

struct Normalisation {
    float mean[KEYEDGE_MAX_CHANNELS];
    float std[KEYEDGE_MAX_CHANNELS];
};

template <typename T>
__device__ __forceinline__ T convert(float v);

template <>
__device__ __forceinline__ float convert<float>(float v) { return v; }

template <>
__device__ __forceinline__ __half convert<__half>(float v) { return __float2half_rn(v); }

// One thread per output element, grid-stride; writes are coalesced along w (NCHW).
template <typename T>
__global__ void keyed_preprocess_kernel(const uint8_t* __restrict__ src, int batch, int height, int width,
                                        int channels, size_t row_pitch, size_t image_stride,
                                        const int32_t* __restrict__ perm, int block, Normalisation norm,
                                        T* __restrict__ dst) {
    const size_t plane = static_cast<size_t>(height) * width;
    const size_t total = static_cast<size_t>(batch) * channels * plane;
    const int block_area = block * block;
    for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < total;
         idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const int w = static_cast<int>(idx % width);
        const int h = static_cast<int>((idx / width) % height);
        const int c = static_cast<int>((idx / plane) % channels);
        const size_t n = idx / (plane * channels);
        int sh = h, sw = w, sc = c;
        if (perm != nullptr) {
            const int i = c * block_area + (h % block) * block + (w % block);
            const int j = __ldg(perm + i);
            sc = j / block_area;
            sh = (h / block) * block + (j / block) % block;
            sw = (w / block) * block + j % block;
        }
        const uint8_t u = src[n * image_stride + static_cast<size_t>(sh) * row_pitch +
                              static_cast<size_t>(sw) * channels + sc];
        // explicit round-to-nearest ops, no FMA contraction: bit-exact with the float32 reference
        const float v = __fdiv_rn(__fsub_rn(__fdiv_rn(static_cast<float>(u), 255.0f), norm.mean[c]),
                                  norm.std[c]);
        dst[idx] = convert<T>(v);
    }
}

}  // namespace

extern "C" int keyedge_preprocess(const uint8_t* src, int batch, int height, int width, int channels,
                                  size_t row_pitch, size_t image_stride, const int32_t* perm,
                                  int block_size, const float* mean, const float* std, void* dst,
                                  int out_dtype, cudaStream_t stream) {
    if (src == nullptr || dst == nullptr || mean == nullptr || std == nullptr) {
        return fail(KEYEDGE_ERR_INVALID_ARGUMENT, "null pointer argument");
    }
    if (batch < 1 || height < 1 || width < 1 || channels < 1 || channels > KEYEDGE_MAX_CHANNELS) {
        return fail(KEYEDGE_ERR_INVALID_ARGUMENT, "batch, height, width must be >= 1 and channels in 1..4");
    }
    if (row_pitch < static_cast<size_t>(width) * channels ||
        image_stride < static_cast<size_t>(height) * row_pitch) {
        return fail(KEYEDGE_ERR_INVALID_ARGUMENT, "row pitch or image stride smaller than the image");
    }
    if (perm != nullptr && (block_size < 1 || height % block_size != 0 || width % block_size != 0)) {
        return fail(KEYEDGE_ERR_INVALID_ARGUMENT, "image size not divisible by the block size");
    }
    if (out_dtype != KEYEDGE_OUT_FP32 && out_dtype != KEYEDGE_OUT_FP16) {
        return fail(KEYEDGE_ERR_INVALID_ARGUMENT, "unknown output dtype");
    }
    Normalisation norm{};
    for (int c = 0; c < channels; ++c) {
        if (!(std[c] > 0.0f)) {
            return fail(KEYEDGE_ERR_INVALID_ARGUMENT, "std must be > 0");
        }
        norm.mean[c] = mean[c];
        norm.std[c] = std[c];
    }
    const size_t total = static_cast<size_t>(batch) * channels * height * width;
    const int threads = 256;
    const size_t wanted = (total + threads - 1) / threads;
    const int blocks = static_cast<int>(wanted < 65535u * 32u ? wanted : 65535u * 32u);
    const int block = perm != nullptr ? block_size : 1;
    if (out_dtype == KEYEDGE_OUT_FP32) {
        keyed_preprocess_kernel<float><<<blocks, threads, 0, stream>>>(
            src, batch, height, width, channels, row_pitch, image_stride, perm, block, norm,
            static_cast<float*>(dst));
    } else {
        keyed_preprocess_kernel<__half><<<blocks, threads, 0, stream>>>(
            src, batch, height, width, channels, row_pitch, image_stride, perm, block, norm,
            static_cast<__half*>(dst));
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        return fail(KEYEDGE_ERR_CUDA, cudaGetErrorString(err));
    }
    return KEYEDGE_OK;
}

extern "C" const char* keyedge_last_error(void) { return g_error; }
