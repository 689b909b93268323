// The host twin of the CUDA kernel: the same keyedge_preprocess_math.h functions, looped over
// (n, h, w) on the CPU instead of a grid. Built with a host compiler and the CUDA headers (for
// __half); tests/runtime/test_kernel_host.py checks it bit for bit against keyedge's shuffle + normalise.
#include <cstddef>
#include <cstdint>

#include "keyedge_preprocess_half.h"

// Same arguments as keyedge_preprocess (host pointers, no stream). Returns nullptr, or why not.
extern "C" const char* keyedge_preprocess_host(const uint8_t* src, int batch, int height, int width, int channels,
                                               size_t row_pitch, size_t image_stride, const int32_t* perm,
                                               int block_size, const float* mean, const float* std, void* dst,
                                               int out_dtype) {
    if (src == nullptr || dst == nullptr || mean == nullptr || std == nullptr) return "null pointer argument";
    if (const char* bad = keyedge_kernel::check_arguments(batch, height, width, channels, row_pitch, image_stride,
                                                          perm != nullptr, block_size, std, out_dtype))
        return bad;
    const auto g = keyedge_kernel::make_geometry(perm != nullptr ? static_cast<uint32_t>(block_size) : 0u);
    if (out_dtype == 0)
        keyedge_kernel::preprocess_images(channels, src, batch, height, width, row_pitch, image_stride, perm, g,
                                          mean, std, static_cast<float*>(dst));
    else
        keyedge_kernel::preprocess_images(channels, src, batch, height, width, row_pitch, image_stride, perm, g,
                                          mean, std, static_cast<__half*>(dst));
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
