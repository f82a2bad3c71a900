// splitmix64 over (seed ^ hash(name)) + element index: counter-based, so threads split freely.
#include "worker/random_values.h"

#include <algorithm>
#include <cmath>
#include <thread>

namespace epic {
namespace {

uint64_t name_hash(const std::string& name) {
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : name) hash = (hash ^ c) * 1099511628211ull;
  return hash;
}

}  // namespace

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

namespace {

// One tensor's draw: element i is center + (2u - 1) * half_width, u uniform in [0, 1) from
// splitmix64(base + i). Shared by the whole-tensor and the range draws so they agree bit for bit.
struct TensorDraw {
  uint64_t base;
  double half_width;
  double center;

  TensorDraw(const std::string& name, const std::vector<int64_t>& shape, RandomInit init, uint64_t seed)
      : base(splitmix64(seed ^ name_hash(name))),
        half_width(init == RandomInit::kNorm        ? 0.5
                   : init == RandomInit::kEmbedding ? std::sqrt(3.0)
                                                    : std::sqrt(3.0 / shape.back())),
        center(init == RandomInit::kNorm ? 1.0 : 0.0) {}

  void fill(uint64_t first, size_t count, float* out) const {
    for (size_t k = 0; k < count; ++k) {
      const double unit = (splitmix64(base + first + k) >> 11) * (1.0 / 9007199254740992.0);
      out[k] = static_cast<float>(center + (2.0 * unit - 1.0) * half_width);
    }
  }
};

}  // namespace

std::vector<float> random_tensor_values(const std::string& name, const std::vector<int64_t>& shape,
                                        RandomInit init, uint64_t seed) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  std::vector<float> values(count);
  const TensorDraw draw(name, shape, init, seed);
  const int64_t num_threads =
      std::clamp<int64_t>(count / (1 << 20), 1, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < num_threads; ++t) {
    threads.emplace_back([&, t] {
      const int64_t begin = count * t / num_threads, end = count * (t + 1) / num_threads;
      draw.fill(static_cast<uint64_t>(begin), static_cast<size_t>(end - begin), values.data() + begin);
    });
  }
  for (auto& thread : threads) thread.join();
  return values;
}

void random_tensor_values_range(const std::string& name, const std::vector<int64_t>& shape, RandomInit init,
                                uint64_t seed, uint64_t first, size_t count, float* out) {
  TensorDraw(name, shape, init, seed).fill(first, count, out);
}

}  // namespace epic
