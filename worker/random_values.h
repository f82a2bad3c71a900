// Deterministic random numbers of epic: the splitmix64 mixer, and random weight tensors whose
// values are a pure function of (seed, tensor name), so make-model's files and bench-moe's
// in-memory weights agree, and neither depends on threads or shard layout.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epic {

uint64_t splitmix64(uint64_t x);

// How a tensor's values are scaled: norms uniform in [0.5, 1.5], embeddings with unit variance,
// linear layers with variance 1/fan_in (fan_in = the last dimension) so activations stay O(1).
enum class RandomInit { kNorm, kEmbedding, kLinear };

std::vector<float> random_tensor_values(const std::string& name, const std::vector<int64_t>& shape,
                                        RandomInit init, uint64_t seed);

// Elements [first, first + count) (flat, row-major) of random_tensor_values(name, shape, init,
// seed), written to out; costs only those elements (each value depends on its index alone), so
// a loader can draw any slice of a 57 GB model without the rest. shape must be non-empty.
void random_tensor_values_range(const std::string& name, const std::vector<int64_t>& shape, RandomInit init,
                                uint64_t seed, uint64_t first, size_t count, float* out);

}  // namespace epic
