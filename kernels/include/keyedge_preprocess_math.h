/*
 * keyedge keyed preprocessing: the per-pixel arithmetic, shared by the CUDA kernel and its CPU twins.
 *
 * Everything here is __host__ __device__ (plain inline functions for a host compiler) and needs no CUDA
 * header, so the very code the GPU runs is compiled for the CPU: by the kernel's host twin
 * (preprocess_host.cpp, tested bit for bit against keyedge's normalize(block_shuffle(x / 255)) in
 * tests/runtime/test_kernel_host.py) and by the C++ runtime's CPU backends. fp16 output, which needs
 * cuda_fp16.h, is in keyedge_preprocess_half.h.
 *
 * For output pixel (h, w) of an image and each channel c (unrolled: C is a compile-time constant):
 *   i = c*M*M + (h % M)*M + (w % M)     the value's index in its (C, M, M) block
 *   j = perm[i]                          its source: channel j / (M*M), row (j / M) % M, column j % M
 *   out[c][h][w] = (src[(h/M)*M + row][(w/M)*M + column][channel] / 255 - mean[c]) / std[c]
 * in float32 with round-to-nearest operations and no contraction; fp16 output is that float32
 * value rounded once to half (round to nearest even), so it equals half(reference) bit for bit.
 *
 * No 64-bit division anywhere on the device: the divisions by M and M*M use a precomputed
 * multiplier (FastDiv), exact for every dividend the kernel meets (see make_fastdiv).
 */
#ifndef KEYEDGE_PREPROCESS_MATH_H
#define KEYEDGE_PREPROCESS_MATH_H

#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define KEYEDGE_HD __host__ __device__ __forceinline__
#else
#define KEYEDGE_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define KEYEDGE_UNROLL _Pragma("unroll")
#else
#define KEYEDGE_UNROLL
#endif

namespace keyedge_kernel {

// n / d as (n * magic) >> 32 with a 64-bit product: exact whenever n * d < 2^32
// (the kernel divides row and column indices < 2^16 by M <= 64, and key indices < 2^14 by M*M).
struct FastDiv {
    uint64_t magic;
    uint32_t divisor;
    KEYEDGE_HD uint32_t div(uint32_t n) const { return static_cast<uint32_t>((n * magic) >> 32); }
};

// Host only (the one 64-bit division, done once per launch on the CPU).
inline FastDiv make_fastdiv(uint32_t d) {
    return FastDiv{(uint64_t{1} << 32) / d + 1, d};
}

// The key's block geometry; block == 0 means no key (plain preprocessing).
struct Geometry {
    uint32_t block;  // M
    uint32_t area;   // M * M
    FastDiv by_block;
    FastDiv by_area;
};

inline Geometry make_geometry(uint32_t block) {
    const uint32_t m = block ? block : 1;
    return Geometry{block, m * m, make_fastdiv(m), make_fastdiv(m * m)};
}

constexpr int kMaxSide = 65535;  // FastDiv is exact for rows/columns below 2^16 (and M <= 64)
constexpr int kMaxBlock = 64;
constexpr int kMaxChannels = 4;

// Host only: why these arguments cannot be preprocessed, or nullptr (out_dtype 0: fp32, 1: fp16).
inline const char* check_arguments(int batch, int height, int width, int channels, size_t row_pitch,
                                   size_t image_stride, bool has_perm, int block_size, const float* std,
                                   int out_dtype) {
    if (batch < 1 || height < 1 || width < 1 || channels < 1 || channels > kMaxChannels)
        return "batch, height, width must be >= 1 and channels in 1..4";
    if (height > kMaxSide || width > kMaxSide) return "height and width must be at most 65535";
    if (row_pitch < static_cast<size_t>(width) * channels || image_stride < static_cast<size_t>(height) * row_pitch)
        return "row pitch or image stride smaller than the image";
    if (has_perm && (block_size < 1 || block_size > kMaxBlock || height % block_size != 0 || width % block_size != 0))
        return "block size must be 1..64 and divide the image size";
    if (out_dtype != 0 && out_dtype != 1) return "unknown output dtype";
    for (int c = 0; c < channels; ++c)
        if (!(std[c] > 0.0f)) return "std must be > 0";
    return nullptr;
}

template <int C>
struct Normalisation {
    float mean[C];
    float std[C];
};

// (u / 255 - mean) / std, each operation rounded to nearest: the float32 reference, bit for bit.
KEYEDGE_HD float normalise(uint8_t u, float mean, float std) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(__fsub_rn(__fdiv_rn(static_cast<float>(u), 255.0f), mean), std);
#else
    return (static_cast<float>(u) / 255.0f - mean) / std;  // IEEE float32 operations (SSE on x86-64)
#endif
}

template <typename Out>
KEYEDGE_HD Out convert(float v);

template <>
KEYEDGE_HD float convert<float>(float v) { return v; }

// Byte offset, within one image, of the source value of output (c, h, w) under the key.
KEYEDGE_HD size_t source_offset(uint32_t c, uint32_t h, uint32_t w, uint32_t channels, size_t row_pitch,
                                const int32_t* perm, const Geometry& g) {
    const uint32_t bh = g.by_block.div(h), bw = g.by_block.div(w);
    const uint32_t i = c * g.area + (h - bh * g.block) * g.block + (w - bw * g.block);
    const uint32_t j = static_cast<uint32_t>(perm[i]);
    const uint32_t sc = g.by_area.div(j);
    const uint32_t r = j - sc * g.area;
    const uint32_t dr = g.by_block.div(r);
    const uint32_t sh = bh * g.block + dr, sw = bw * g.block + (r - dr * g.block);
    return static_cast<size_t>(sh) * row_pitch + static_cast<size_t>(sw) * channels + sc;
}

// All C outputs of pixel (h, w) of one image. Without a key the pixel's C bytes are read once,
// together; with one, each output reads its own source byte (the key is a bijection, so every
// input byte is still read once per image). Writes: one value per channel plane (NCHW).
template <int C, typename Out>
KEYEDGE_HD void preprocess_pixel(const uint8_t* image, size_t row_pitch, uint32_t h, uint32_t w,
                                 const int32_t* perm, const Geometry& g, const Normalisation<C>& norm,
                                 Out* out_image, size_t plane, size_t out_index) {
    uint8_t v[C];
    if (perm == nullptr) {
        const uint8_t* px = image + static_cast<size_t>(h) * row_pitch + static_cast<size_t>(w) * C;
KEYEDGE_UNROLL
        for (int c = 0; c < C; ++c) v[c] = px[c];
    } else {
KEYEDGE_UNROLL
        for (int c = 0; c < C; ++c) v[c] = image[source_offset(c, h, w, C, row_pitch, perm, g)];
    }
KEYEDGE_UNROLL
    for (int c = 0; c < C; ++c) {
        out_image[static_cast<size_t>(c) * plane + out_index] = convert<Out>(normalise(v[c], norm.mean[c], norm.std[c]));
    }
}

// Host only: every pixel of ``batch`` images, a loop where the kernel has a grid (the CPU twins' loop).
template <int C, typename Out>
inline void preprocess_images(const uint8_t* src, int batch, int height, int width, size_t row_pitch,
                              size_t image_stride, const int32_t* perm, const Geometry& g, const float* mean,
                              const float* std, Out* dst) {
    Normalisation<C> norm{};
    for (int c = 0; c < C; ++c) {
        norm.mean[c] = mean[c];
        norm.std[c] = std[c];
    }
    const size_t plane = static_cast<size_t>(height) * width;
    for (int n = 0; n < batch; ++n)
        for (uint32_t h = 0; h < static_cast<uint32_t>(height); ++h)
            for (uint32_t w = 0; w < static_cast<uint32_t>(width); ++w)
                preprocess_pixel<C, Out>(src + n * image_stride, row_pitch, h, w, perm, g, norm, dst + n * (C * plane),
                                         plane, static_cast<size_t>(h) * width + w);
}

// Host only: preprocess_images for a channel count known at run time (1..kMaxChannels; check_arguments first).
template <typename Out>
inline void preprocess_images(int channels, const uint8_t* src, int batch, int height, int width, size_t row_pitch,
                              size_t image_stride, const int32_t* perm, const Geometry& g, const float* mean,
                              const float* std, Out* dst) {
    switch (channels) {
        case 1: preprocess_images<1>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
        case 2: preprocess_images<2>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
        case 3: preprocess_images<3>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
        default: preprocess_images<4>(src, batch, height, width, row_pitch, image_stride, perm, g, mean, std, dst); break;
    }
}

}  // namespace keyedge_kernel

#endif /* KEYEDGE_PREPROCESS_MATH_H */
