// The host twin of the CUDA kernel: the same keyedge_preprocess_math.h functions, looped over
// (n, h, w) on the CPU instead of a grid. Built with a host compiler and the CUDA headers (for
// __half); tests/test_kernel_host.py checks it bit for bit against keyedge's shuffle + normalise.
#include <cstddef>
#include <cstdint>

#include "keyedge_preprocess_math.h"

namespace {

using keyedge_kernel::Geometry;
using keyedge_kernel::Normalisation;

template <int C, typename Out>
void run(const uint8_t* src, int batch, int height, int width, size_t row_pitch, size_t image_stride,
         const int32_t* perm, const Geometry& g, const float* mean, const float* std, Out* dst) {
    Normalisation<C> norm{};
    for (int c = 0; c < C; ++c) {
        norm.mean[c] = mean[c];
        norm.std[c] = std[c];
    }
    const size_t plane = static_cast<size_t>(height) * width;
    for (int n = 0; n < batch; ++n)
        for (uint32_t h = 0; h < static_cast<uint32_t>(height); ++h)
            for (uint32_t w = 0; w < static_cast<uint32_t>(width); ++w)
                keyedge_kernel::preprocess_pixel<C, Out>(src + n * image_stride, row_pitch, h, w, perm, g, norm,
                                                         dst + n * (C * plane), plane, static_cast<size_t>(h) * width + w);
}

template <typename Out>
void dispatch(int channels, const uint8_t* src, int batch, int height, int width, size_t row_pitch,
              size_t image_stride, const int32_t* perm, const Geometry& g, const float* mean, const float* std,
              Out* dst) {
    switch (channels) {
        case 1: run<1>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
        case 2: run<2>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
        case 3: run<3>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
        default: run<4>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
    }
}

}  // namespace

// Same arguments as keyedge_preprocess (host pointers, no stream). Returns nullptr, or why not.
extern "C" const char* keyedge_preprocess_host(const uint8_t* src, int batch, int height, int width, int channels,
                                               size_t row_pitch, size_t image_stride, const int32_t* perm,
                                               int block_size, const float* mean, const float* std, void* dst,
                                               int out_dtype) {
    if (src == nullptr || dst == nullptr || mean == nullptr || std == nullptr) return "null pointer argument";
    if (const char* bad = keyedge_kernel::check_arguments(batch, height, width, channels, row_pitch, image_stride,
                                                          perm != nullptr, block_size, std, out_dtype))
        return bad;
    const Geometry g = keyedge_kernel::make_geometry(perm != nullptr ? static_cast<uint32_t>(block_size) : 0u);
    if (out_dtype == 0)
        dispatch(channels, src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, static_cast<float*>(dst));
    else
        dispatch(channels, src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, static_cast<__half*>(dst));
    return nullptr;
}

// FastDiv against the division operator over every dividend and divisor the kernel can meet.
// Returns the number of mismatches (0).
extern "C" long keyedge_fastdiv_selftest(void) {
    long bad = 0;
    for (uint32_t d = 1; d <= keyedge_kernel::kMaxBlock; ++d) {  // rows and columns by M
        const auto f = keyedge_kernel::make_fastdiv(d);
        for (uint32_t n = 0; n <= keyedge_kernel::kMaxSide; ++n) bad += f.div(n) != n / d;
    }
    for (uint32_t m = 1; m <= keyedge_kernel::kMaxBlock; ++m) {  // key indices by M*M
        const uint32_t area = m * m;
        const auto f = keyedge_kernel::make_fastdiv(area);
        for (uint32_t n = 0; n < area * keyedge_kernel::kMaxChannels; ++n) bad += f.div(n) != n / area;
    }
    return bad;
}
