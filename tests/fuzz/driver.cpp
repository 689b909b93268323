// A fuzzing driver for keyedge's fuzz targets where libFuzzer is not available (g++): it runs every input of
// the seed corpus, then mutates them for a bounded time with a seeded PRNG (no coverage feedback). Each
// target defines LLVMFuzzerTestOneInput, so with clang the same target builds with -fsanitize=fuzzer
// instead of this driver.
//
//   fuzz_TARGET [--seconds N] [--seed S] [--max-len BYTES] [--crash-dir DIR] [--outcomes] [--check-names] PATH...
//
// PATH: corpus files or folders. --outcomes: one line per seed, "NAME<TAB>ok" or "NAME<TAB>refused: MESSAGE".
// --check-names: a seed named ok-* must be accepted, one named bad-* refused (a keyedge::Error).
// A failure exits 1 and leaves the input in DIR/crash-TARGET: an exception other than keyedge::Error, a refusal
// that is not one line, a sanitizer report (build with -fsanitize=address,undefined -fno-sanitize-recover=all),
// a crash, or an input that runs for more than 20 seconds.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include "fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

// UndefinedBehaviorSanitizer: abort on a report, so that the SIGABRT handler below saves the input (ASan's
// reports reach on_death through its death callback).
extern "C" const char* __ubsan_default_options() { return "abort_on_error=1:print_stacktrace=1"; }

namespace {

using Input = std::vector<uint8_t>;
constexpr unsigned kTimeoutSeconds = 20;

// The input being run, for the handlers of a crash (async-signal-safe: plain memory and write(2) only).
const uint8_t* g_data = nullptr;
size_t g_size = 0;
char g_crash_path[4096] = "crash";

void say(const char* text) {
  if (::write(2, text, std::strlen(text)) < 0) return;
}

void write_crash() {
  const int fd = ::open(g_crash_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  for (size_t done = 0; fd >= 0 && done < g_size;) {
    const ssize_t n = ::write(fd, g_data + done, g_size - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  if (fd >= 0) ::close(fd);
  say("fuzz: the failing input is in ");
  say(g_crash_path);
  say("\n");
}

void on_death() { write_crash(); }  // a sanitizer report

void on_signal(int sig) {
  say(sig == SIGALRM ? "fuzz: FAILURE: an input ran for too long\n" : "fuzz: FAILURE: a crash (signal)\n");
  write_crash();
  if (sig == SIGALRM) ::_exit(1);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz: FAILURE: %s\n", what.c_str());
  write_crash();
  std::exit(1);
}

// Run one input from an exact-size heap copy (reading past its end is a sanitizer report); returns its refusal.
std::string run_one(const Input& in) {
  std::unique_ptr<uint8_t[]> copy(new uint8_t[in.size()]);
  if (!in.empty()) std::memcpy(copy.get(), in.data(), in.size());
  g_data = copy.get();
  g_size = in.size();
  ::alarm(kTimeoutSeconds);
  try {
    LLVMFuzzerTestOneInput(copy.get(), in.size());
  } catch (const std::exception& e) {
    fail(std::string("an exception escaped the target: ") + e.what());
  } catch (...) {
    fail("a non-standard exception escaped the target");
  }
  ::alarm(0);
  return keyedge_fuzz::refusal();
}

// ---- mutations ------------------------------------------------------------------------------------------

const char* const kTokens[] = {
    "1e400", "-", "+", "1e300", "-1", "0", "-0", "0.5", "1.0", "2147483648", "4294967296", "9223372036854775808",
    "18446744073709551616", "-9223372036854775809", "null", "true", "false", "\"\"", "[]", "{}", "\"\\u0000\"",
    "\"../x\"", "\"..\"", "\".\"", "\"a/b\"", "\"a\\\\b\"", "\"\\ud800\"", "\"\\n\"", "\"dynamic\"", "\"NHWC\"",
    "\"uint8\"", "\"keyedge-engine\"", "{\"name\": \"model.onnx\", \"size\": 1}", ",", ":", "\"", "\xff", "\xc0\x80"};
const uint8_t kBytes[] = {0, 1, 2, 3, 4, 0x10, 0x1f, 0x20, 0x7f, 0x80, 0xfe, 0xff, '[', '{', ']', '}', '"', ',',
                          ':', '-', '0', '9', 'e', '.', '/', '\\'};
const uint64_t kFields[] = {0, 1, 2, 3, 4, 16, 64, 65, 255, 256, 4095, 4096, 32767, 32768, 65535, 65536,
                            1u << 20, (1u << 20) + 16, 0x7fffffff, 0x80000000, 0xffffffff};

class Mutator {
 public:
  Mutator(const std::vector<Input>& corpus, uint64_t seed, size_t max_len)
      : corpus_(corpus), rng_(seed), max_len_(max_len) {}

  Input next() {
    Input x = corpus_[below(corpus_.size())];
    for (size_t rounds = 1 + below(4); rounds > 0; --rounds) mutate(x);
    if (x.size() > max_len_) x.resize(max_len_);
    return x;
  }

 private:
  size_t below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(rng_() % n); }
  size_t at(const Input& x) { return below(x.size() + 1); }  // a position, end included

  void insert(Input& x, const Input& what) {
    const size_t pos = at(x);
    x.insert(x.begin() + static_cast<long>(pos), what.begin(), what.end());
  }

  void mutate(Input& x) {
    switch (below(10)) {
      case 0:  // flip a bit
        if (!x.empty()) x[below(x.size())] ^= static_cast<uint8_t>(1u << below(8));
        break;
      case 1:  // a byte set to an interesting value
        if (!x.empty()) x[below(x.size())] = kBytes[below(sizeof(kBytes))];
        break;
      case 2: {  // a little-endian 2- or 4-byte field set to an interesting value
        const size_t width = below(2) ? 4 : 2;
        if (x.size() < width) break;
        const size_t pos = below(x.size() - width + 1);
        const uint64_t v = kFields[below(sizeof(kFields) / sizeof(kFields[0]))];
        for (size_t b = 0; b < width; ++b) x[pos + b] = static_cast<uint8_t>(v >> (8 * b));
        break;
      }
      case 3:  // truncate
        x.resize(below(x.size() + 1));
        break;
      case 4: {  // insert a copy of a range (duplication)
        const size_t from = below(x.size()), len = below(std::min<size_t>(x.size() - from, 4096) + 1);
        insert(x, Input(x.begin() + static_cast<long>(from), x.begin() + static_cast<long>(from + len)));
        break;
      }
      case 5: {  // erase a range
        const size_t from = below(x.size()), len = below(std::min<size_t>(x.size() - from, 4096) + 1);
        x.erase(x.begin() + static_cast<long>(from), x.begin() + static_cast<long>(from + len));
        break;
      }
      case 6: {  // splice: this input's head, another's tail
        const Input& other = corpus_[below(corpus_.size())];
        x.resize(at(x));
        x.insert(x.end(), other.begin() + static_cast<long>(below(other.size() + 1)), other.end());
        break;
      }
      case 7: {  // deep nesting
        static const size_t depths[] = {63, 64, 65, 100, 1000, 100000};
        static const char* const openers[] = {"[", "{\"a\":", "[{\"files\":"};
        const std::string opener = openers[below(3)];
        Input deep;
        for (size_t i = depths[below(6)]; i > 0; --i) deep.insert(deep.end(), opener.begin(), opener.end());
        insert(x, deep);
        break;
      }
      case 8: {  // insert a JSON token
        const std::string t = kTokens[below(sizeof(kTokens) / sizeof(kTokens[0]))];
        insert(x, Input(t.begin(), t.end()));
        break;
      }
      default: {  // replace a number in the text with a JSON token
        auto is_digit = [](uint8_t c) { return c >= '0' && c <= '9'; };
        auto digit = std::find_if(x.begin() + static_cast<long>(below(x.size())), x.end(), is_digit);
        if (digit == x.end()) break;
        auto end = std::find_if(digit, x.end(), [&](uint8_t c) { return !is_digit(c) && c != '.' && c != 'e'; });
        const std::string t = kTokens[below(sizeof(kTokens) / sizeof(kTokens[0]))];
        const auto pos = x.erase(digit, end);
        x.insert(pos, t.begin(), t.end());
        break;
      }
    }
  }

  const std::vector<Input>& corpus_;
  std::mt19937_64 rng_;
  size_t max_len_;
};

// ---- the corpus --------------------------------------------------------------------------------------------

struct Seed {
  std::string name;
  Input data;
};

std::vector<Seed> load_corpus(const std::vector<std::string>& paths) {
  namespace fs = std::filesystem;
  std::vector<fs::path> files;
  for (const std::string& p : paths) {
    if (fs::is_directory(p)) {
      std::vector<fs::path> in_dir;
      for (const auto& entry : fs::directory_iterator(p))
        if (entry.is_regular_file()) in_dir.push_back(entry.path());
      std::sort(in_dir.begin(), in_dir.end());
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else if (fs::is_regular_file(p)) {
      files.emplace_back(p);
    } else {
      std::fprintf(stderr, "fuzz: %s is not a corpus file or folder\n", p.c_str());
      std::exit(2);
    }
  }
  std::vector<Seed> seeds;
  for (const fs::path& f : files) {
    std::ifstream in(f, std::ios::binary);
    Input data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    seeds.push_back({f.filename().string(), std::move(data)});
  }
  return seeds;
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

int main(int argc, char** argv) {
  double seconds = 0;
  uint64_t seed = 1;
  size_t max_len = 1 << 20;
  bool outcomes = false, check_names = false;
  std::string crash_dir = ".";
  std::vector<std::string> paths;
  const std::string target = std::filesystem::path(argv[0]).filename().string();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--seconds" && has_value) seconds = std::atof(argv[++i]);
    else if (a == "--seed" && has_value) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--max-len" && has_value) max_len = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--crash-dir" && has_value) crash_dir = argv[++i];
    else if (a == "--outcomes") outcomes = true;
    else if (a == "--check-names") check_names = true;
    else if (starts_with(a, "--")) {
      std::fprintf(stderr, "usage: %s [--seconds N] [--seed S] [--max-len BYTES] [--crash-dir DIR] [--outcomes] "
                           "[--check-names] PATH...\n", target.c_str());
      return 2;
    } else paths.push_back(a);
  }
  std::snprintf(g_crash_path, sizeof(g_crash_path), "%s/crash-%s", crash_dir.c_str(), target.c_str());
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_set_death_callback(on_death);
#endif
  for (int sig : {SIGABRT, SIGALRM, SIGBUS, SIGFPE, SIGILL}) std::signal(sig, on_signal);

  const std::vector<Seed> seeds = load_corpus(paths);
  if (seeds.empty()) {
    std::fprintf(stderr, "fuzz: %s: no corpus inputs\n", target.c_str());
    return 2;
  }
  std::vector<Input> corpus;
  size_t accepted = 0, wrong = 0;
  for (const Seed& s : seeds) {
    const std::string refusal = run_one(s.data);
    accepted += refusal.empty();
    const std::string outcome = refusal.empty() ? "ok" : "refused: " + refusal;
    if (outcomes) std::printf("%s\t%s\n", s.name.c_str(), outcome.c_str());
    const bool ok_name = starts_with(s.name, "ok-"), bad_name = starts_with(s.name, "bad-");
    const bool expected = ok_name ? refusal.empty() : !bad_name || !refusal.empty();
    if (check_names && !expected) {
      std::fprintf(stderr, "fuzz: seed %s: expected %s, got %s\n", s.name.c_str(), refusal.empty() ? "a refusal" : "ok",
                   outcome.c_str());
      ++wrong;
    }
    corpus.push_back(s.data);
  }
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  Mutator mutator(corpus, seed, max_len);
  size_t runs = 0;
  while (Clock::now() < deadline)
    for (int i = 0; i < 16; ++i, ++runs) run_one(mutator.next());
  const double took = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf("%s: %zu seeds (%zu accepted, %zu refused), %zu mutated inputs in %.1f s (seed %llu)%s\n",
              target.c_str(), seeds.size(), accepted, seeds.size() - accepted, runs, took,
              static_cast<unsigned long long>(seed), wrong ? "" : ": no failure");
  if (wrong) std::fprintf(stderr, "fuzz: %zu seeds had the wrong outcome for their names\n", wrong);
  return wrong ? 1 : 0;
}
