// keyedge fused keyed preprocessing kernel (see include/keyedge_preprocess.h).
//
// A 3-D grid over (w, h, n): no element index is ever divided. Each thread owns one output pixel
// position (h, w) and writes all C channels of it (C a template parameter: mean/std stay in
// registers, unrolled); a block is 32 x 8 pixels, so reads of a pixel's bytes and writes of each
// channel plane are coalesced along w. grid.z is sized from the device's SM count and the
// kernel's occupancy; each z-slice loops over the images n = z, z + gridDim.z, ...
// The per-pixel arithmetic lives in keyedge_preprocess_math.h, shared with the CPU twins.
#include "keyedge_preprocess.h"
#include "keyedge_preprocess_half.h"

#include <cstdio>

namespace {

using keyedge_kernel::Geometry;
using keyedge_kernel::Normalisation;

constexpr int kBlockX = 32;
constexpr int kBlockY = 8;

thread_local char g_error[256] = "no error";

int fail(int code, const char* message) {
    std::snprintf(g_error, sizeof(g_error), "%s", message);
    return code;
}

template <int C, typename Out>
__global__ void __launch_bounds__(kBlockX * kBlockY)
keyed_preprocess_kernel(const uint8_t* __restrict__ src, uint32_t batch, uint32_t height, uint32_t width,
                        size_t row_pitch, size_t image_stride, const int32_t* __restrict__ perm, Geometry g,
                        Normalisation<C> norm, Out* __restrict__ dst) {
    const uint32_t w = blockIdx.x * kBlockX + threadIdx.x;
    const uint32_t h = blockIdx.y * kBlockY + threadIdx.y;
    if (w >= width || h >= height) return;
    const size_t plane = static_cast<size_t>(height) * width;
    const size_t out_index = static_cast<size_t>(h) * width + w;
    for (uint32_t n = blockIdx.z; n < batch; n += gridDim.z) {
        keyedge_kernel::preprocess_pixel<C, Out>(src + n * image_stride, row_pitch, h, w, perm, g, norm,
                                                 dst + n * (C * plane), plane, out_index);
    }
}

template <int C, typename Out>
int launch(const uint8_t* src, int batch, int height, int width, size_t row_pitch, size_t image_stride,
           const int32_t* perm, const Geometry& g, const float* mean, const float* std, void* dst,
           cudaStream_t stream) {
    Normalisation<C> norm{};
    for (int c = 0; c < C; ++c) {
        norm.mean[c] = mean[c];
        norm.std[c] = std[c];
    }
    const auto kernel = keyed_preprocess_kernel<C, Out>;
    int device = 0, sms = 0, resident = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kBlockX * kBlockY, 0);
    if (err != cudaSuccess) return fail(KEYEDGE_ERR_CUDA, cudaGetErrorString(err));
    const dim3 block(kBlockX, kBlockY, 1);
    const unsigned gx = (static_cast<unsigned>(width) + kBlockX - 1) / kBlockX;
    const unsigned gy = (static_cast<unsigned>(height) + kBlockY - 1) / kBlockY;
    // enough z-slices to fill every SM at full occupancy, no more than there are images
    const unsigned long long wanted = (static_cast<unsigned long long>(sms) * (resident > 0 ? resident : 1) +
                                       gx * gy - 1) / (gx * gy);
    unsigned gz = static_cast<unsigned>(wanted < static_cast<unsigned long long>(batch) ? wanted : batch);
    gz = gz < 1 ? 1 : (gz > 65535 ? 65535 : gz);
    kernel<<<dim3(gx, gy, gz), block, 0, stream>>>(src, static_cast<uint32_t>(batch), static_cast<uint32_t>(height),
                                                   static_cast<uint32_t>(width), row_pitch, image_stride, perm, g,
                                                   norm, static_cast<Out*>(dst));
    err = cudaGetLastError();
    return err == cudaSuccess ? static_cast<int>(KEYEDGE_OK) : fail(KEYEDGE_ERR_CUDA, cudaGetErrorString(err));
}

template <typename Out>
int dispatch(int channels, const uint8_t* src, int batch, int height, int width, size_t row_pitch,
             size_t image_stride, const int32_t* perm, const Geometry& g, const float* mean, const float* std,
             void* dst, cudaStream_t stream) {
    switch (channels) {
        case 1: return launch<1, Out>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst, stream);
        case 2: return launch<2, Out>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst, stream);
        case 3: return launch<3, Out>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst, stream);
        default: return launch<4, Out>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst, stream);
    }
}

}  // namespace

extern "C" int keyedge_preprocess(const uint8_t* src, int batch, int height, int width, int channels,
                                  size_t row_pitch, size_t image_stride, const int32_t* perm,
                                  int block_size, const float* mean, const float* std, void* dst,
                                  int out_dtype, cudaStream_t stream) {
    if (src == nullptr || dst == nullptr || mean == nullptr || std == nullptr)
        return fail(KEYEDGE_ERR_INVALID_ARGUMENT, "null pointer argument");
    if (const char* bad = keyedge_kernel::check_arguments(batch, height, width, channels, row_pitch, image_stride,
                                                          perm != nullptr, block_size, std, out_dtype))
        return fail(KEYEDGE_ERR_INVALID_ARGUMENT, bad);
    const Geometry g = keyedge_kernel::make_geometry(perm != nullptr ? static_cast<uint32_t>(block_size) : 0u);
    return out_dtype == KEYEDGE_OUT_FP32
               ? dispatch<float>(channels, src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst, stream)
               : dispatch<__half>(channels, src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst, stream);
}

extern "C" const char* keyedge_last_error(void) { return g_error; }
