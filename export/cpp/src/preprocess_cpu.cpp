// keyedge C++ runtime: the one uint8 HWC -> graph-input conversion, and the CPU twin of the CUDA kernel,
// which runs the kernel's own per-pixel code (kernels/include/keyedge_preprocess_math.h) in a loop.
#include <type_traits>

#include "internal.hpp"
#include "keyedge_preprocess_math.h"

namespace keyedge {

template <typename T>
void hwc_to_input(const uint8_t* hwc, int batch, const InputSpec& s, T* out) {
  const size_t plane = size_t(s.height) * s.width;
  for (int n = 0; n < batch; ++n)
    for (size_t px = 0; px < plane; ++px)
      for (int c = 0; c < s.channels; ++c) {
        const uint8_t u = hwc[(n * plane + px) * s.channels + c];
        T v;
        if constexpr (std::is_same_v<T, float>) v = static_cast<float>(u) / 255.0f;
        else v = u;
        if (s.nhwc) out[(n * plane + px) * s.channels + c] = v;
        else out[(size_t(n) * s.channels + c) * plane + px] = v;
      }
}

template void hwc_to_input<float>(const uint8_t*, int, const InputSpec&, float*);
template void hwc_to_input<uint8_t>(const uint8_t*, int, const InputSpec&, uint8_t*);

void keyed_preprocess_cpu(const uint8_t* hwc, int batch, const InputSpec& s, const std::vector<int32_t>& perm,
                          int block, const std::vector<float>& mean, const std::vector<float>& std, float* out) {
  const size_t row = size_t(s.width) * s.channels, image = row * s.height;
  // before any gather: the key is one M x M x C block, M divides the image (check_arguments), one mean and
  // std per channel
  if (block < 1 || s.channels < 1 || perm.size() != size_t(block) * size_t(block) * size_t(s.channels) ||
      mean.size() != size_t(s.channels) || std.size() != size_t(s.channels))
    throw Error("keyed preprocessing: the key and the normalisation do not fit the input");
  if (const char* bad = keyedge_kernel::check_arguments(batch, s.height, s.width, s.channels, row, image, true, block,
                                                        std.data(), 0))
    throw Error(std::string("keyed preprocessing: ") + bad);
  keyedge_kernel::preprocess_images(s.channels, hwc, batch, s.height, s.width, row, image, perm.data(),
                                    keyedge_kernel::make_geometry(static_cast<uint32_t>(block)), mean.data(),
                                    std.data(), out);
}

}  // namespace keyedge
