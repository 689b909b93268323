// keyedge C++ runtime: reading files, little-endian fields, SHA-256 (libsodium), and memory for secrets.
#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "internal.hpp"

namespace keyedge {
namespace {

struct File {
  int fd = -1;
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

// Open a regular file of at most max_size bytes; returns its size.
size_t open_regular(const std::string& path, const std::string& what, size_t max_size, File& f) {
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) throw Error(what + " " + path + " does not exist or cannot be read");
  struct stat st {};
  if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) throw Error(what + " " + path + " is not a regular file");
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) > max_size)
    throw Error(what + " " + path + " is too large (" + std::to_string(st.st_size) + " bytes)");
  return static_cast<size_t>(st.st_size);
}

void read_exactly(const File& f, uint8_t* out, size_t n, const std::string& path, const std::string& what) {
  for (size_t done = 0; done < n;) {
    const ssize_t got = ::read(f.fd, out + done, n - done);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw Error("cannot read " + what + " " + path + " (it changed while it was read)");
    done += static_cast<size_t>(got);
  }
}

}  // namespace

std::vector<uint8_t> read_bytes(const std::string& path, const std::string& what, size_t max_size) {
  File f;
  std::vector<uint8_t> out(open_regular(path, what, max_size, f));
  read_exactly(f, out.data(), out.size(), path, what);
  return out;
}

SecretBuffer read_secret(const std::string& path, const std::string& what, size_t max_size) {
  File f;
  SecretBuffer out(open_regular(path, what, max_size, f));
  read_exactly(f, out.data(), out.size(), path, what);
  return out;
}

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }

uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

void init_sodium() {
  if (sodium_init() < 0) throw Error("libsodium failed to initialise");
}

std::array<uint8_t, 32> sha256(std::initializer_list<std::pair<const uint8_t*, size_t>> parts) {
  crypto_hash_sha256_state st;
  crypto_hash_sha256_init(&st);
  for (const auto& [data, n] : parts) crypto_hash_sha256_update(&st, data, n);
  std::array<uint8_t, 32> out{};
  crypto_hash_sha256_final(&st, out.data());
  return out;
}

std::string hex(const uint8_t* data, size_t n) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out += digits[data[i] >> 4];
    out += digits[data[i] & 15];
  }
  return out;
}

// ---- SecretBuffer ---------------------------------------------------------------------------------

SecretBuffer::SecretBuffer(size_t size) : size_(size) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  if (size > SIZE_MAX - page) throw Error("cannot allocate " + std::to_string(size) + " bytes");
  mapped_ = (size + page - 1) / page * page + (size == 0 ? page : 0);
  void* p = ::mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw Error("cannot allocate " + std::to_string(size) + " bytes of memory");
  data_ = static_cast<uint8_t*>(p);
  locked_ = ::mlock(p, mapped_) == 0;  // best effort: RLIMIT_MEMLOCK may be small
#ifdef MADV_DONTDUMP
  ::madvise(p, mapped_, MADV_DONTDUMP);
#endif
#ifdef MADV_WIPEONFORK
  ::madvise(p, mapped_, MADV_WIPEONFORK);
#endif
}

void SecretBuffer::release() noexcept {
  if (data_ == nullptr) return;
  sodium_memzero(data_, mapped_);
  if (locked_) ::munlock(data_, mapped_);
  ::munmap(data_, mapped_);
  data_ = nullptr;
  size_ = mapped_ = 0;
  locked_ = false;
}

SecretBuffer::~SecretBuffer() { release(); }

SecretBuffer::SecretBuffer(SecretBuffer&& other) noexcept { *this = std::move(other); }

SecretBuffer& SecretBuffer::operator=(SecretBuffer&& other) noexcept {
  if (this != &other) {
    release();
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(mapped_, other.mapped_);
    std::swap(locked_, other.locked_);
  }
  return *this;
}

}  // namespace keyedge
