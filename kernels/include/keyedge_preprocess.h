/*
 * keyedge fused keyed preprocessing: uint8 HWC images -> key gather -> per-channel
 * normalise -> NCHW fp32 or fp16, in one pass on the GPU.
 *
 * Semantics (bit-exact in fp32 with keyedge's normalize(block_shuffle(x / 255))):
 *   for output element (n, c, h, w), with M the block size and
 *   i = c*M*M + (h % M)*M + (w % M) the value's index in its (C, M, M) block,
 *   j = perm[i] is the source index: sc = j / (M*M), sr = (j / M) % M, ss = j % M;
 *   out[n][c][h][w] = (src[n][(h/M)*M + sr][(w/M)*M + ss][sc] / 255 - mean[c]) / std[c]
 * With perm == NULL (or block_size == 0) no shuffle is applied (plain preprocessing).
 */
#ifndef KEYEDGE_PREPROCESS_H
#define KEYEDGE_PREPROCESS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KEYEDGE_MAX_CHANNELS 4

typedef enum {
    KEYEDGE_OUT_FP32 = 0,
    KEYEDGE_OUT_FP16 = 1
} keyedge_out_dtype;

typedef enum {
    KEYEDGE_OK = 0,
    KEYEDGE_ERR_INVALID_ARGUMENT = 1,
    KEYEDGE_ERR_CUDA = 2
} keyedge_status;

/*
 * src            device pointer to the first image (uint8, HWC, rows of width*channels bytes)
 * batch          number of images
 * height, width  image size; both divisible by block_size when a key is given
 * channels       1..KEYEDGE_MAX_CHANNELS
 * row_pitch      bytes between rows (>= width * channels; e.g. from cudaMallocPitch)
 * image_stride   bytes between images (>= height * row_pitch)
 * perm           device pointer to block_size*block_size*channels int32 source indices, or NULL
 * block_size     key block size M (ignored when perm is NULL)
 * mean, std      host arrays of `channels` floats (normalisation after the shuffle)
 * dst            device pointer to batch*channels*height*width outputs (NCHW, contiguous)
 * out_dtype      KEYEDGE_OUT_FP32 or KEYEDGE_OUT_FP16
 * stream         CUDA stream (0 for the default stream); the call is asynchronous
 * Returns KEYEDGE_OK, or an error code; keyedge_last_error() describes it.
 */
int keyedge_preprocess(const uint8_t* src, int batch, int height, int width, int channels,
                       size_t row_pitch, size_t image_stride, const int32_t* perm, int block_size,
                       const float* mean, const float* std, void* dst, int out_dtype,
                       cudaStream_t stream);

/* A static, human-readable description of the last error on this thread. */
const char* keyedge_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* KEYEDGE_PREPROCESS_H */
