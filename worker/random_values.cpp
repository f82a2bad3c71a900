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

std::vector<float> random_tensor_values(const std::string& name, const std::vector<int64_t>& shape,
                                        RandomInit init, uint64_t seed) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  std::vector<float> values(count);
  const uint64_t base = splitmix64(seed ^ name_hash(name));
  const double half_width = init == RandomInit::kNorm        ? 0.5
                            : init == RandomInit::kEmbedding ? std::sqrt(3.0)
                                                             : std::sqrt(3.0 / shape.back());
  const double center = init == RandomInit::kNorm ? 1.0 : 0.0;
  const int64_t num_threads =
      std::clamp<int64_t>(count / (1 << 20), 1, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < num_threads; ++t) {
    threads.emplace_back([&, t] {
      for (int64_t i = count * t / num_threads; i < count * (t + 1) / num_threads; ++i) {
        const double unit = (splitmix64(base + static_cast<uint64_t>(i)) >> 11) * (1.0 / 9007199254740992.0);
        values[i] = static_cast<float>(center + (2.0 * unit - 1.0) * half_width);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return values;
}

}  // namespace epic
