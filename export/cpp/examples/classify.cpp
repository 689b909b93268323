// classify: read a PPM (P6/P3) or PNG image, print the top-5 classes of a keyedge model.
//
//   classify MODEL|BUNDLE.kes IMAGE [--key key.bin] [--device-key device.key] [--trust publisher.pub]...
//            [--allow-unsigned] [--dump-logits FILE] [--device N] [--cuda-graph] [--ensemble-draw S]
//
// A random ensemble answers with S of its members drawn afresh (libsodium's CSPRNG): their mean probability.
// A sealed bundle must be signed by a publisher this package trusts (compiled in) or one given with --trust;
// --allow-unsigned (development only) opens an unsigned one. The image must have the model's input size.
// Errors: one line on stderr, exit code 1.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifdef KEYEDGE_HAVE_PNG
#include <png.h>
#endif

#include "keyedge_model.hpp"

namespace {

struct Image {
  int width = 0, height = 0, channels = 3;
  std::vector<uint8_t> pixels;  // HWC
};

Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string magic;
  in >> magic;
  if (magic != "P6" && magic != "P3") throw keyedge::Error(path + " is not a PPM (P6/P3) image");
  auto next_int = [&in, &path]() {
    int v = -1;
    while (in >> std::ws && in.peek() == '#') in.ignore(1 << 20, '\n');
    if (!(in >> v)) throw keyedge::Error(path + ": malformed PPM header");
    return v;
  };
  Image img;
  img.width = next_int();
  img.height = next_int();
  const int maxval = next_int();
  if (img.width <= 0 || img.height <= 0 || maxval != 255) throw keyedge::Error(path + ": only 8-bit PPM is supported");
  img.pixels.resize(size_t(img.width) * img.height * 3);
  if (magic == "P6") {
    in.get();
    in.read(reinterpret_cast<char*>(img.pixels.data()), static_cast<std::streamsize>(img.pixels.size()));
    if (in.gcount() != static_cast<std::streamsize>(img.pixels.size())) throw keyedge::Error(path + ": truncated PPM");
  } else {
    for (auto& p : img.pixels) p = static_cast<uint8_t>(next_int());
  }
  return img;
}

#ifdef KEYEDGE_HAVE_PNG
Image read_png(const std::string& path) {
  png_image png;
  std::memset(&png, 0, sizeof(png));
  png.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&png, path.c_str())) throw keyedge::Error(path + ": " + png.message);
  png.format = PNG_FORMAT_RGB;
  Image img;
  img.width = static_cast<int>(png.width);
  img.height = static_cast<int>(png.height);
  img.pixels.resize(PNG_IMAGE_SIZE(png));
  if (!png_image_finish_read(&png, nullptr, img.pixels.data(), 0, nullptr)) throw keyedge::Error(path + ": " + png.message);
  return img;
}
#endif

int small_count(const std::string& text, const char* option) {
  if (text.empty() || text.size() > 4 || text.find_first_not_of("0123456789") != std::string::npos)
    throw keyedge::Error(std::string(option) + " takes a small non-negative integer, not " + text);
  return std::stoi(text);
}

#ifdef KEYEDGE_ENSEMBLE_TEST_API
std::vector<int64_t> member_list(const std::string& text) {  // "0,2": the members that answer (test builds)
  std::vector<int64_t> out;
  std::istringstream in(text);
  for (std::string part; std::getline(in, part, ',');) out.push_back(small_count(part, "--members"));
  return out;
}
#endif

Image read_image(const std::string& path) {
  std::ifstream probe(path, std::ios::binary);
  if (!probe) throw keyedge::Error("image " + path + " does not exist");
  char sig[8] = {};
  probe.read(sig, 8);
  if (std::memcmp(sig, "\x89PNG", 4) == 0) {
#ifdef KEYEDGE_HAVE_PNG
    return read_png(path);
#else
    throw keyedge::Error("this build reads PPM only (libpng was not found)");
#endif
  }
  return read_ppm(path);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    std::string model_path, image_path, key_path, dump, device_key;
    keyedge::Options options;
#ifdef KEYEDGE_ENSEMBLE_TEST_API
    std::vector<int64_t> members;  // test builds: a chosen draw
#endif
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i] == "--key" && i + 1 < args.size()) key_path = args[++i];
      else if (args[i] == "--dump-logits" && i + 1 < args.size()) dump = args[++i];
      else if (args[i] == "--device" && i + 1 < args.size()) options.device = small_count(args[++i], "--device");
      else if (args[i] == "--ensemble-draw" && i + 1 < args.size())
        options.ensemble_draw = small_count(args[++i], "--ensemble-draw");
#ifdef KEYEDGE_ENSEMBLE_TEST_API
      else if (args[i] == "--members" && i + 1 < args.size()) members = member_list(args[++i]);
#endif
      else if (args[i] == "--cuda-graph") options.cuda_graph = true;
      else if (args[i] == "--device-key" && i + 1 < args.size()) device_key = args[++i];
      else if (args[i] == "--trust" && i + 1 < args.size()) options.trusted_publishers.push_back(args[++i]);
      else if (args[i] == "--allow-unsigned") options.allow_unsigned = true;
      else if (model_path.empty()) model_path = args[i];
      else if (image_path.empty()) image_path = args[i];
      else throw keyedge::Error("unexpected argument " + args[i]);
    }
    if (model_path.empty() || image_path.empty())
      throw keyedge::Error("usage: classify MODEL|BUNDLE.kes IMAGE [--key key.bin] [--device-key device.key] "
                           "[--trust publisher.pub]... [--allow-unsigned] [--dump-logits FILE] [--device N] "
                           "[--cuda-graph] [--ensemble-draw S]");
    const bool sealed = model_path.size() > 4 && model_path.compare(model_path.size() - 4, 4, ".kes") == 0;
    if (sealed && device_key.empty()) throw keyedge::Error("a sealed bundle needs --device-key");
    auto model = sealed ? keyedge::Model::load_sealed(model_path, device_key, options)
                        : keyedge::Model::load(model_path, key_path, options);
    Image img = read_image(image_path);
    const auto& spec = model->input();
    if (img.width != spec.width || img.height != spec.height)
      throw keyedge::Error("image is " + std::to_string(img.width) + "x" + std::to_string(img.height) +
                           " but the model takes " + std::to_string(spec.width) + "x" + std::to_string(spec.height));
    std::vector<float> logits(model->num_classes());
#ifdef KEYEDGE_ENSEMBLE_TEST_API
    if (!members.empty())
      model->answer_for_draw(img.pixels.data(), 1, members, static_cast<int>(members.size()), logits.data());
    else
#endif
      model->infer(img.pixels.data(), 1, logits.data());
    if (!dump.empty()) {
      std::ofstream out(dump);
      out.precision(9);
      for (float v : logits) out << v << "\n";
    }
    const auto& classes = model->manifest().classes;
    std::cout << "backend: " << model->backend() << "\n";
    for (auto [cls, prob] : model->top_k(logits.data(), 5)) {
      std::cout << cls << "\t" << prob << "\t"
                << (cls < static_cast<int>(classes.size()) ? classes[cls] : std::string()) << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "classify: error: " << e.what() << "\n";
    return 1;
  }
}
