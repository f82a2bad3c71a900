// One table of backend ops x shapes, run over every backend present and every activation and
// weight type it takes (the ggml test-backend-ops pattern): each row makes random never-zero inputs
// (per-run seed), NaN- or sentinel-filled outputs, and states its tolerance. The CPU backend is
// checked against double-precision references (kernel_test_support.h); CUDA against the CPU backend
// on the same inputs (bf16 runs: the inputs rounded to bf16 once on the host, for both). Every
// output element is compared. Then the invalid-argument table, run on every backend, and the
// CPU's own checks, memory and thread-count independence.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <set>

#include "kernels/backend.h"
#include "kernels/error.h"
#include "tests/kernels/kernel_test_support.h"

#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace epic {
namespace {

using namespace kernel_test;

// ---- backends ----------------------------------------------------------------------------------

enum class BackendKind { kCpu, kCuda };

const char* backend_name(BackendKind kind) { return kind == BackendKind::kCpu ? "cpu" : "cuda"; }

// The backend, or nullptr and why it is not here (the caller skips visibly).
std::unique_ptr<Backend> make_backend(BackendKind kind, std::string& missing) {
  if (kind == BackendKind::kCpu) return make_cpu_backend();
#ifdef EPIC_HAVE_CUDA
  if (cuda_device_count() == 0) {
    missing =
        "no CUDA device (cuda_device_count() == 0: no driver or no GPU); the CUDA backend is compiled "
        "here but its ops are only checked on a GPU machine";
    return nullptr;
  }
  return make_cuda_backend(0);
#else
  missing = "this build has no CUDA backend (EPIC_ENABLE_CUDA=OFF or no nvcc)";
  return nullptr;
#endif
}

// ---- host tensors: data of a table row, typed on the backend by their role ----------------------

enum class Role {
  kActivation,  // the run's activation type (f32 or bf16)
  kWeight,      // the run's weight type (f32 or bf16)
  kF32,         // always f32 (routing weights, router logits)
  kI32,
  kU8,
};

struct HostTensor {
  std::string name;
  Role role = Role::kF32;
  std::vector<int64_t> shape;
  std::vector<float> values;   // kActivation, kWeight, kF32
  std::vector<int32_t> ints;   // kI32
  std::vector<uint8_t> bytes;  // kU8
  bool output = false;         // read back and compared after the op
};

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

HostTensor blank(const char* name, Role role, std::vector<int64_t> shape) {
  HostTensor t;
  t.name = name;
  t.role = role;
  t.shape = std::move(shape);
  return t;
}
HostTensor floats(const char* name, Role role, std::vector<int64_t> shape, std::vector<float> values,
                  bool output = false) {
  HostTensor t = blank(name, role, std::move(shape));
  t.values = std::move(values);
  t.output = output;
  return t;
}
HostTensor act_in(const char* name, std::vector<int64_t> shape, std::vector<float> values) {
  return floats(name, Role::kActivation, std::move(shape), std::move(values));
}
HostTensor act_out(const char* name, std::vector<int64_t> shape) {
  const int64_t n = numel(shape);
  return floats(name, Role::kActivation, std::move(shape), nan_filled(n), true);
}
HostTensor weight_in(const char* name, std::vector<int64_t> shape, std::vector<float> values) {
  return floats(name, Role::kWeight, std::move(shape), std::move(values));
}
HostTensor i32_in(const char* name, std::vector<int64_t> shape, std::vector<int32_t> ints) {
  HostTensor t = blank(name, Role::kI32, std::move(shape));
  t.ints = std::move(ints);
  return t;
}
// Sentinel-filled: an entry never written cannot pass as a valid id or offset.
HostTensor i32_out(const char* name, std::vector<int64_t> shape) {
  HostTensor t = i32_in(name, shape, std::vector<int32_t>(static_cast<size_t>(numel(shape)), -12345));
  t.output = true;
  return t;
}

ScalarType type_of(Role role, ScalarType activation, ScalarType weight) {
  switch (role) {
    case Role::kActivation:
      return activation;
    case Role::kWeight:
      return weight;
    case Role::kF32:
      return ScalarType::kF32;
    case Role::kI32:
      return ScalarType::kI32;
    case Role::kU8:
      return ScalarType::kU8;
  }
  return ScalarType::kF32;
}

// A tensor of any shape in the backend's memory (new_tensor takes an initializer list).
OwnedTensor make_tensor(Backend& backend, ScalarType type, const std::vector<int64_t>& shape) {
  Tensor view(nullptr, type, backend.memory_space(), {});
  view.rank = static_cast<int>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) view.dims[i] = shape[i];
  std::unique_ptr<Buffer> buffer = backend.allocate(view.bytes());
  view.data = buffer->data();
  return OwnedTensor(std::move(buffer), view);
}

std::vector<uint8_t> encode(const HostTensor& host, ScalarType type) {
  std::vector<uint8_t> bytes;
  // (memcpy of zero bytes from an empty vector's null data() is still undefined: guarded)
  if (type == ScalarType::kI32) {
    bytes.resize(host.ints.size() * 4);
    if (!bytes.empty()) std::memcpy(bytes.data(), host.ints.data(), bytes.size());
  } else if (type == ScalarType::kU8) {
    bytes = host.bytes;
  } else if (type == ScalarType::kF32) {
    bytes.resize(host.values.size() * 4);
    if (!bytes.empty()) std::memcpy(bytes.data(), host.values.data(), bytes.size());
  } else {
    bytes.resize(host.values.size() * 2);
    for (size_t i = 0; i < host.values.size(); ++i) {
      const uint16_t bits = to_bf16_bits(host.values[i]);
      std::memcpy(&bytes[i * 2], &bits, 2);
    }
  }
  return bytes;
}

void decode(const std::vector<uint8_t>& bytes, ScalarType type, HostTensor& host) {
  if (bytes.empty()) return;
  if (type == ScalarType::kI32) {
    std::memcpy(host.ints.data(), bytes.data(), bytes.size());
  } else if (type == ScalarType::kF32) {
    std::memcpy(host.values.data(), bytes.data(), bytes.size());
  } else if (type == ScalarType::kBF16) {
    for (size_t i = 0; i < host.values.size(); ++i) {
      uint16_t bits;
      std::memcpy(&bits, &bytes[i * 2], 2);
      host.values[i] = from_bf16_bits(bits);
    }
  } else {
    host.bytes = bytes;
  }
}

// ---- the op table --------------------------------------------------------------------------------

// The reference result of one output tensor: values with the scale each error is measured against,
// or exact ints.
struct Expected {
  std::vector<double> values, scale;
  std::vector<int32_t> ints;
};

struct Tolerance {
  double cpu;        // CPU vs the double reference, relative to the scale
  double cuda_f32;   // CUDA (f32 activations) vs the CPU backend, same scale
  double cuda_bf16;  // CUDA (bf16 activations) vs the CPU backend on the same bf16-rounded inputs
  // Where >= 0: the f32 outputs (Role::kF32) of a CUDA bf16 run, for ops whose f32 outputs no bf16
  // rounding reaches (the residual stream), so cuda_bf16 would be needlessly loose for them.
  double cuda_bf16_f32_outputs = -1.0;
};

using Tensors = std::vector<Tensor>;
using HostTensors = std::vector<HostTensor>;

struct OpCase {
  std::string name;
  bool has_weights;  // run with f32 and with bf16 weights
  Tolerance tolerance;
  std::function<HostTensors(std::mt19937_64&)> make;
  std::function<void(Backend&, const Tensors&)> run;
  std::function<std::vector<Expected>(const HostTensors&)> reference;  // one per output, in order
};

std::string dims_name(std::initializer_list<int64_t> values, std::initializer_list<const char*> names) {
  std::string text;
  auto value = values.begin();
  for (const char* name : names)
    text += std::string(text.empty() ? "" : "_") + name + std::to_string(*value++);
  return text;
}

constexpr float kEps = 1e-6f;

// ---- embed, linear, rms_norm ----

void add_embed_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t rows, vocab, hidden;
  };
  for (const Shape s : {Shape{1, 5, 3}, Shape{17, 100, 130}, Shape{130, 1000, 64}}) {
    cases.push_back(OpCase{
        "embed_" + dims_name({s.rows, s.vocab, s.hidden}, {"rows", "vocab", "hidden"}),
        true,
        // A row copy: exact, except the one bf16 rounding of f32 weights into bf16 activations.
        {0.0, 0.0, 4e-3},
        [s](std::mt19937_64& g) {
          std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(s.vocab - 1));
          std::vector<int32_t> ids(static_cast<size_t>(s.rows));
          for (int32_t& i : ids) i = id(g);
          return HostTensors{i32_in("ids", {s.rows}, ids),
                             weight_in("table", {s.vocab, s.hidden}, random_values(g, s.vocab * s.hidden)),
                             act_out("out", {s.rows, s.hidden})};
        },
        [](Backend& b, const Tensors& t) { b.embed(t[0], t[1], t[2]); },
        [s](const HostTensors& t) {
          Expected out;
          for (int64_t r = 0; r < s.rows; ++r)
            for (int64_t i = 0; i < s.hidden; ++i)
              out.values.push_back(t[1].values[t[0].ints[r] * s.hidden + i]);
          out.scale = absolute(out.values);
          return std::vector<Expected>{out};
        }});
  }
}

void add_linear_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t rows, in_dim, out_dim;
  };
  const std::vector<Shape> shapes = {
      {1, 1, 1},        {1, 3, 17},    {3, 17, 130}, {17, 130, 3},
      {2, 2048, 1},     {5, 128, 257}, {130, 17, 5}, {3, 0, 5},  // in_dim 0: an empty sum, every y must be 0
      {64, 2048, 2053},                                          // large enough for the multi-threaded path
      // cuda paths by shape: bf16 at 1-2 rows with in % 8 == 0 streams the weights (linear_skinny),
      // from 3 rows cuBLAS; f32 x bf16 from 512 rows (or past 1024 outputs) splits x into three exact
      // bf16 parts.
      {1, 264, 77},     {2, 136, 1030}, {600, 136, 40}, {9, 136, 40}, {40, 264, 77},
  };
  for (const bool f32_logits : {false, true}) {
    for (const Shape s : shapes) {
      if (f32_logits && s.rows * s.out_dim * s.in_dim > (int64_t{1} << 24)) continue;
      cases.push_back(OpCase{
          std::string(f32_logits ? "linear_f32_logits_" : "linear_") +
              dims_name({s.rows, s.in_dim, s.out_dim}, {"rows", "in", "out"}),
          true,
          // fp32 sums of in_dim/8 terms per lane: ~1e-7 of sum |x_i w_i| typically, worst case
          // (in_dim/8 + 3) * 2^-24 = 1.5e-5 at in_dim 2048. CUDA sums in another order: 2e-6 of the
          // same scale. bf16 activations: the result is rounded to bf16 (2^-9), f32 logits are not.
          {1e-5, 2e-6, f32_logits ? 2e-5 : 4e-3},
          [s, f32_logits](std::mt19937_64& g) {
            HostTensor y = act_out("y", {s.rows, s.out_dim});
            if (f32_logits) y.role = Role::kF32;  // router / lm_head logits stay f32 with bf16 activations
            return HostTensors{act_in("x", {s.rows, s.in_dim}, random_values(g, s.rows * s.in_dim)),
                               weight_in("w", {s.out_dim, s.in_dim}, random_values(g, s.out_dim * s.in_dim)),
                               y};
          },
          [](Backend& b, const Tensors& t) { b.linear(t[0], t[1], t[2]); },
          [s](const HostTensors& t) {
            Expected y;
            y.values.resize(static_cast<size_t>(s.rows * s.out_dim));
            y.scale.resize(y.values.size());
            reference_linear(t[0].values.data(), t[1].values.data(), s.rows, s.in_dim, s.out_dim,
                             y.values.data(), y.scale.data());
            // An empty sum is exactly 0: measure it against 1 so that only 0 passes.
            if (s.in_dim == 0) std::fill(y.scale.begin(), y.scale.end(), 1.0);
            return std::vector<Expected>{y};
          }});
    }
  }
}

void add_rms_norm_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t rows, dim;
  };
  for (const bool in_place : {false, true}) {
    for (const Shape s : {Shape{1, 1}, Shape{3, 17}, Shape{17, 130}, Shape{5, 2048}, Shape{130, 128}}) {
      cases.push_back(OpCase{
          std::string(in_place ? "rms_norm_in_place_" : "rms_norm_") +
              dims_name({s.rows, s.dim}, {"rows", "dim"}),
          true,
          // A few fp32 roundings per element (the CPU sums the squares in double, the GPU in fp32
          // in a tree): 1e-6 and 2e-6 relative; bf16 activations: one bf16 rounding of y.
          {1e-6, 2e-6, 4e-3},
          [s, in_place](std::mt19937_64& g) {
            HostTensor x = act_in("x", {s.rows, s.dim}, random_values(g, s.rows * s.dim, 3.0f));
            HostTensor weight = weight_in("weight", {s.dim}, random_values(g, s.dim));
            if (in_place) {
              x.output = true;
              return HostTensors{x, weight};
            }
            return HostTensors{x, weight, act_out("y", {s.rows, s.dim})};
          },
          [in_place](Backend& b, const Tensors& t) { b.rms_norm(t[0], t[1], in_place ? t[0] : t[2], kEps); },
          [s](const HostTensors& t) {
            Expected y;
            y.values.resize(static_cast<size_t>(s.rows * s.dim));
            for (int64_t r = 0; r < s.rows; ++r) {
              reference_rms_norm_row(&t[0].values[r * s.dim], t[1].values.data(), s.dim, kEps,
                                     &y.values[r * s.dim]);
            }
            y.scale = absolute(y.values);
            return std::vector<Expected>{y};
          }});
    }
  }
}

// residual += delta; normed (and normed_f32) = rms_norm(residual): the reference norms the residual
// as stored (the fp32 sum), as every backend does.
void add_add_rms_norm_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t rows, dim;
  };
  for (const bool with_f32 : {false, true}) {
    for (const Shape s : {Shape{1, 1}, Shape{1, 2048}, Shape{3, 17}, Shape{2, 1001}, Shape{17, 130},
                          Shape{5, 2048}, Shape{130, 128}}) {
      cases.push_back(OpCase{
          std::string(with_f32 ? "add_rms_norm_f32_copy_" : "add_rms_norm_") +
              dims_name({s.rows, s.dim}, {"rows", "dim"}),
          true,
          // rms_norm's tolerances (the residual add is one correctly rounded fp32 add, the same on
          // every backend); the f32 outputs of a bf16 run (residual, normed_f32) see no bf16
          // rounding, so they keep the f32 bound.
          {1e-6, 2e-6, 4e-3, 2e-6},
          [s, with_f32](std::mt19937_64& g) {
            const int64_t n = s.rows * s.dim;
            HostTensors t{floats("delta", Role::kF32, {s.rows, s.dim}, random_values(g, n)),
                          floats("residual", Role::kF32, {s.rows, s.dim}, random_values(g, n, 3.0f), true),
                          weight_in("weight", {s.dim}, random_values(g, s.dim)),
                          act_out("normed", {s.rows, s.dim})};
            if (with_f32) t.push_back(floats("normed_f32", Role::kF32, {s.rows, s.dim}, nan_filled(n), true));
            return t;
          },
          [with_f32](Backend& b, const Tensors& t) {
            b.add_rms_norm(t[0], t[1], t[2], t[3], with_f32 ? t[4] : Tensor{}, kEps);
          },
          [s, with_f32](const HostTensors& t) {
            const int64_t n = s.rows * s.dim;
            Expected residual, normed;
            std::vector<float> stored(static_cast<size_t>(n));  // the residual as fp32 holds it
            for (int64_t i = 0; i < n; ++i) {
              const float delta = t[0].values[i], before = t[1].values[i];
              residual.values.push_back(static_cast<double>(before) + delta);
              residual.scale.push_back(std::abs(before) + std::abs(delta));
              stored[i] = before + delta;
            }
            normed.values.resize(static_cast<size_t>(n));
            for (int64_t r = 0; r < s.rows; ++r) {
              reference_rms_norm_row(&stored[r * s.dim], t[2].values.data(), s.dim, kEps,
                                     &normed.values[r * s.dim]);
            }
            normed.scale = absolute(normed.values);
            if (with_f32) return std::vector<Expected>{residual, normed, normed};
            return std::vector<Expected>{residual, normed};
          }});
    }
  }
}

// ---- attention: qk_norm_rope, store_kv, attention ----

void add_qk_norm_rope_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t rows, heads, kv_heads, head_dim;
    double theta;
    int32_t max_position;  // positions are random in [0, max_position], in no particular order
  };
  const std::vector<Shape> shapes = {
      {1, 1, 1, 2, 1e4, 0},         {3, 4, 2, 18, 1e4, 17},
      {17, 32, 4, 128, 1e6, 40000}, {5, 6, 3, 64, 1e4, 130},
      {130, 2, 1, 130, 1e6, 130},   {2, 4, 4, 128, 1e6, 1000000},  // far beyond any context
  };
  for (const Shape s : shapes) {
    const AttentionShape shape{s.heads, s.kv_heads, s.head_dim};
    cases.push_back(OpCase{
        "qk_norm_rope_" + dims_name({s.rows, s.heads, s.kv_heads, s.head_dim, s.max_position},
                                    {"rows", "heads", "kv", "dim", "maxpos"}),
        true,
        // A norm (1e-6 relative) then a rotation with cos/sin rounded to fp32: 3e-6 of |x_i cos| +
        // |x_{i+half} sin| on both backends (the GPU may fuse products into FMAs); bf16: one rounding
        // of the result (v is untouched: exact everywhere).
        {3e-6, 3e-6, 8e-3},
        [s, shape](std::mt19937_64& g) {
          HostTensor qkv =
              act_in("qkv", {s.rows, shape.qkv_dim()}, random_values(g, s.rows * shape.qkv_dim(), 3.0f));
          qkv.output = true;
          std::uniform_int_distribution<int32_t> position(0, s.max_position);
          std::vector<int32_t> positions(static_cast<size_t>(s.rows));
          for (int32_t& p : positions) p = position(g);
          return HostTensors{qkv, weight_in("q_norm", {s.head_dim}, random_values(g, s.head_dim)),
                             weight_in("k_norm", {s.head_dim}, random_values(g, s.head_dim)),
                             i32_in("positions", {s.rows}, positions)};
        },
        [s, shape](Backend& b, const Tensors& t) {
          b.qk_norm_rope(t[0], t[1], t[2], t[3], shape, kEps, s.theta);
        },
        [s, shape](const HostTensors& t) {
          Expected qkv;
          qkv.values.resize(t[0].values.size());
          qkv.scale.resize(t[0].values.size());
          std::vector<double> normed(static_cast<size_t>(s.head_dim));
          for (int64_t r = 0; r < s.rows; ++r) {
            for (int64_t h = 0; h < s.heads + 2 * s.kv_heads; ++h) {
              const int64_t at = r * shape.qkv_dim() + h * s.head_dim;
              if (h >= s.heads + s.kv_heads) {  // v: untouched
                for (int64_t d = 0; d < s.head_dim; ++d) {
                  qkv.values[at + d] = t[0].values[at + d];
                  qkv.scale[at + d] = std::abs(qkv.values[at + d]);
                }
                continue;
              }
              const std::vector<float>& weight = h < s.heads ? t[1].values : t[2].values;
              reference_rms_norm_row(&t[0].values[at], weight.data(), s.head_dim, kEps, normed.data());
              reference_rope_head(normed.data(), s.head_dim, t[3].ints[r], s.theta, &qkv.values[at],
                                  &qkv.scale[at]);
            }
          }
          return std::vector<Expected>{qkv};
        }});
  }
}

void add_store_kv_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t rows, heads, kv_heads, head_dim, num_blocks;
    bool padding;  // every fifth row has slot -1 and must write nothing
  };
  for (const Shape s :
       {Shape{1, 2, 1, 8, 1, false}, Shape{17, 8, 2, 64, 4, true}, Shape{130, 32, 4, 128, 12, true}}) {
    const AttentionShape shape{s.heads, s.kv_heads, s.head_dim};
    cases.push_back(OpCase{
        "store_kv_" +
            dims_name({s.rows, s.heads, s.kv_heads, s.head_dim, s.num_blocks},
                      {"rows", "heads", "kv", "dim", "blocks"}) +
            (s.padding ? "_padding" : ""),
        false,
        {0.0, 0.0, 0.0},  // copies: exact (the bf16 inputs are already rounded)
        [s, shape](std::mt19937_64& g) {
          const int64_t pool_elements = s.num_blocks * kKvBlockSize * shape.kv_dim();
          std::vector<int32_t> slots(static_cast<size_t>(s.num_blocks * kKvBlockSize));
          std::iota(slots.begin(), slots.end(), 0);
          std::shuffle(slots.begin(), slots.end(), g);
          slots.resize(static_cast<size_t>(s.rows));
          for (int64_t r = 0; s.padding && r < s.rows; r += 5) slots[r] = -1;
          // The pools start with values of their own: what a row does not write must stay.
          HostTensor key_pool = act_in("key_pool", {s.num_blocks, kKvBlockSize, s.kv_heads, s.head_dim},
                                       random_values(g, pool_elements, 7.0f));
          HostTensor value_pool = act_in("value_pool", {s.num_blocks, kKvBlockSize, s.kv_heads, s.head_dim},
                                         random_values(g, pool_elements, 7.0f));
          key_pool.output = value_pool.output = true;
          return HostTensors{
              act_in("qkv", {s.rows, shape.qkv_dim()}, random_values(g, s.rows * shape.qkv_dim())),
              i32_in("slot_mapping", {s.rows}, slots), key_pool, value_pool};
        },
        [shape](Backend& b, const Tensors& t) { b.store_kv(t[0], t[1], t[2], t[3], shape); },
        [s, shape](const HostTensors& t) {
          std::vector<Expected> pools(2);
          for (int which = 0; which < 2; ++which) {
            pools[which].values = to_double(t[2 + which].values);
            for (int64_t r = 0; r < s.rows; ++r) {
              if (t[1].ints[r] < 0) continue;
              for (int64_t i = 0; i < shape.kv_dim(); ++i) {
                pools[which].values[t[1].ints[r] * shape.kv_dim() + i] =
                    t[0].values[r * shape.qkv_dim() + shape.q_dim() + which * shape.kv_dim() + i];
              }
            }
            pools[which].scale = absolute(pools[which].values);
          }
          return pools;
        }});
  }
}

struct AttentionCase {
  // Per sequence: (rows of queries, position of the first): its rows attend positions 0 .. first +
  // i, all of them already in the pool.
  std::vector<std::pair<int64_t, int64_t>> sequences;
  int64_t heads, kv_heads, head_dim;
  float amplitude;  // of q and k: 20 gives scores of several hundred (exp overflows without the max)
  Tolerance tolerance;
  const char* what;
};

void add_attention_cases(std::vector<OpCase>& cases) {
  // Relative to sum_j p_j |v_j|. The bf16 rows: q, k and v were rounded on the host for both
  // backends; the GPU may round probabilities or partial sums to bf16 and rounds the result: 1e-2.
  const std::vector<AttentionCase> table = {
      {{{1, 0}}, 1, 1, 1, 1.0f, {1e-5, 2e-5, 1e-2}, "one_token"},
      {{{3, 0}}, 4, 2, 18, 1.0f, {1e-5, 2e-5, 1e-2}, "prefill"},
      {{{1, 129}, {1, 0}, {1, 37}}, 32, 4, 128, 1.0f, {1e-5, 2e-5, 1e-2}, "decode_batch"},
      {{{17, 5}}, 32, 4, 128, 1.0f, {1e-5, 2e-5, 1e-2}, "chunk_after_cache"},
      {{{5, 12}, {1, 200}, {9, 0}}, 6, 3, 130, 1.0f, {1e-5, 2e-5, 1e-2}, "mixed_batch"},
      {{{300, 0}}, 8, 8, 64, 1.0f, {1e-5, 2e-5, 1e-2}, "long_prompt"},
      // Scores of ~+-15: a sharp but not one-hot softmax. Loosened 2x: the fp32 error of a score
      // grows with |q| |k| (16x here).
      {{{9, 40}}, 16, 2, 128, 4.0f, {2e-5, 4e-5, 2e-2}, "sharp"},
      // Scores of several hundred: the fp32 error of such a score (~1e-4 absolute) becomes a
      // relative error of the probabilities when two keys nearly tie.
      {{{4, 3}}, 4, 1, 128, 20.0f, {3e-4, 3e-4, 5e-2}, "huge_scores"},
  };
  for (const AttentionCase& c : table) {
    const AttentionShape shape{c.heads, c.kv_heads, c.head_dim};
    int64_t rows = 0, blocks_needed = 0, max_blocks = 0;
    for (const auto& [num_queries, first] : c.sequences) {
      rows += num_queries;
      const int64_t blocks = (first + num_queries + kKvBlockSize - 1) / kKvBlockSize;
      blocks_needed += blocks;
      max_blocks = std::max(max_blocks, blocks);
    }
    const int64_t num_blocks = blocks_needed + 3;  // spare blocks nobody reads
    const int64_t num_sequences = static_cast<int64_t>(c.sequences.size());
    cases.push_back(OpCase{
        std::string("attention_") + c.what + "_" +
            dims_name({rows, c.heads, c.kv_heads, c.head_dim}, {"rows", "heads", "kv", "dim"}),
        false, c.tolerance,
        [=](std::mt19937_64& g) {
          // Each sequence's blocks are scattered over the pool in random order; unused table
          // entries are -1.
          std::vector<int32_t> free_blocks(static_cast<size_t>(num_blocks));
          std::iota(free_blocks.begin(), free_blocks.end(), 0);
          std::shuffle(free_blocks.begin(), free_blocks.end(), g);
          std::vector<int32_t> tables(static_cast<size_t>(num_sequences * max_blocks), -1);
          std::vector<int32_t> row_sequence, positions;
          size_t next_block = 0;
          for (int64_t q = 0; q < num_sequences; ++q) {
            const auto [num_queries, first] = c.sequences[q];
            for (int64_t b = 0; b * kKvBlockSize < first + num_queries; ++b)
              tables[q * max_blocks + b] = free_blocks[next_block++];
            for (int64_t i = 0; i < num_queries; ++i) {
              row_sequence.push_back(static_cast<int32_t>(q));
              positions.push_back(static_cast<int32_t>(first + i));
            }
          }
          // Rows in random order: a row's result must depend only on its sequence and position.
          std::vector<size_t> order(row_sequence.size());
          std::iota(order.begin(), order.end(), 0);
          std::shuffle(order.begin(), order.end(), g);
          std::vector<int32_t> shuffled_sequence, shuffled_positions;
          for (size_t i : order) {
            shuffled_sequence.push_back(row_sequence[i]);
            shuffled_positions.push_back(positions[i]);
          }
          std::vector<float> qkv = random_values(g, rows * shape.qkv_dim());
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < shape.q_dim(); ++i) qkv[r * shape.qkv_dim() + i] *= c.amplitude;
          const int64_t pool_elements = num_blocks * kKvBlockSize * shape.kv_dim();
          const std::vector<int64_t> pool_shape = {num_blocks, kKvBlockSize, c.kv_heads, c.head_dim};
          return HostTensors{act_in("qkv", {rows, shape.qkv_dim()}, qkv),
                             act_in("key_pool", pool_shape, random_values(g, pool_elements, c.amplitude)),
                             act_in("value_pool", pool_shape, random_values(g, pool_elements)),
                             i32_in("block_tables", {num_sequences, max_blocks}, tables),
                             i32_in("row_sequence", {rows}, shuffled_sequence),
                             i32_in("positions", {rows}, shuffled_positions),
                             act_out("out", {rows, shape.q_dim()})};
        },
        [shape](Backend& b, const Tensors& t) {
          b.attention(t[0], t[1], t[2], t[3], t[4], t[5], shape, t[6]);
        },
        [=](const HostTensors& t) {
          Expected out;
          out.values.resize(static_cast<size_t>(rows * shape.q_dim()));
          out.scale.resize(out.values.size());
          const int64_t group = c.heads / c.kv_heads;
          for (int64_t r = 0; r < rows; ++r) {
            const int32_t* table = &t[3].ints[t[4].ints[r] * max_blocks];
            for (int64_t h = 0; h < c.heads; ++h) {
              std::vector<const float*> keys, values;
              for (int64_t p = 0; p <= t[5].ints[r]; ++p) {
                const int64_t slot = int64_t{table[p / kKvBlockSize]} * kKvBlockSize + p % kKvBlockSize;
                const int64_t at = (slot * c.kv_heads + h / group) * c.head_dim;
                keys.push_back(&t[1].values[at]);
                values.push_back(&t[2].values[at]);
              }
              const int64_t at = r * shape.q_dim() + h * c.head_dim;
              reference_attention_head(&t[0].values[r * shape.qkv_dim() + h * c.head_dim], keys, values,
                                       c.head_dim, &out.values[at], &out.scale[at]);
            }
          }
          return std::vector<Expected>{out};
        }});
  }
}

// decode_attention: one row per sequence at its newest position `first` (keys 0 .. first - 1 already in
// the pool); the op rotates q and k, stores k and v at the row's slot and attends 0 .. first. A row with
// slot -1 stores nothing and reads its own position from the pool. Shapes on both sides of the CUDA fused
// path's limits (16 rows, 4096 keys a table, head_dim 64/128/256).
struct DecodeAttentionCase {
  std::vector<int64_t> firsts;  // per row (= sequence): its position
  int64_t heads, kv_heads, head_dim;
  int64_t table_blocks;  // block-table width (>= what the rows need): the fused path's key limit
  bool unslotted_row;    // the last row has slot -1
  const char* what;
};

void add_decode_attention_cases(std::vector<OpCase>& cases) {
  std::vector<int64_t> many_rows(17);
  for (size_t i = 0; i < many_rows.size(); ++i) many_rows[i] = static_cast<int64_t>(3 * i % 41);
  const std::vector<DecodeAttentionCase> table = {
      {{0}, 32, 4, 128, 1, false, "first_position"},
      {{37}, 32, 4, 128, 6, false, "one_row"},
      {{5, 129, 37, 16, 15}, 32, 4, 128, 9, true, "batch"},
      {{300, 2}, 6, 3, 64, 20, false, "head_dim_64"},
      {{40, 7}, 4, 2, 256, 3, false, "head_dim_256"},
      {{600}, 8, 8, 128, 64, false, "no_groups"},
      {std::vector<int64_t>(many_rows.begin(), many_rows.begin() + 16), 8, 4, 64, 3, true, "at_fused_rows"},
      {many_rows, 8, 4, 64, 3, false, "past_fused_rows"},
      {{4100}, 2, 1, 128, 257, false, "past_fused_keys"},
  };
  // CPU: fp32 rotation (3e-6) and attention over it; CUDA bf16 rounds the rotated q and k to bf16 (the
  // three ops do too) where the CPU keeps fp32: ~1% of a probability, as the attention rows allow.
  const Tolerance tolerance{1e-4, 1e-4, 3e-2};
  for (const DecodeAttentionCase& c : table) {
    const AttentionShape shape{c.heads, c.kv_heads, c.head_dim};
    const int64_t rows = static_cast<int64_t>(c.firsts.size());
    int64_t blocks_needed = 0;
    for (int64_t first : c.firsts) blocks_needed += first / kKvBlockSize + 1;
    const int64_t num_blocks = blocks_needed + 2;  // spare blocks nobody reads
    const double theta = 1e6;
    cases.push_back(OpCase{
        std::string("decode_attention_") + c.what + "_" +
            dims_name({rows, c.heads, c.kv_heads, c.head_dim}, {"rows", "heads", "kv", "dim"}),
        true, tolerance,
        [=](std::mt19937_64& g) {
          std::vector<int32_t> free_blocks(static_cast<size_t>(num_blocks));
          std::iota(free_blocks.begin(), free_blocks.end(), 0);
          std::shuffle(free_blocks.begin(), free_blocks.end(), g);
          std::vector<int32_t> tables(static_cast<size_t>(rows * c.table_blocks), -1);
          std::vector<int32_t> positions, slots, row_sequence;
          size_t next_block = 0;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t first = c.firsts[r];
            for (int64_t b = 0; b <= first / kKvBlockSize; ++b) tables[r * c.table_blocks + b] = free_blocks[next_block++];
            positions.push_back(static_cast<int32_t>(first));
            row_sequence.push_back(static_cast<int32_t>(r));
            const int32_t slot = tables[r * c.table_blocks + first / kKvBlockSize] * static_cast<int32_t>(kKvBlockSize) +
                                 static_cast<int32_t>(first % kKvBlockSize);
            slots.push_back(c.unslotted_row && r == rows - 1 ? -1 : slot);
          }
          const int64_t pool_elements = num_blocks * kKvBlockSize * shape.kv_dim();
          const std::vector<int64_t> pool_shape = {num_blocks, kKvBlockSize, c.kv_heads, c.head_dim};
          HostTensor key_pool = act_in("key_pool", pool_shape, random_values(g, pool_elements, 2.0f));
          HostTensor value_pool = act_in("value_pool", pool_shape, random_values(g, pool_elements));
          key_pool.output = value_pool.output = true;
          return HostTensors{act_in("qkv", {rows, shape.qkv_dim()}, random_values(g, rows * shape.qkv_dim(), 3.0f)),
                             weight_in("q_norm", {c.head_dim}, random_values(g, c.head_dim)),
                             weight_in("k_norm", {c.head_dim}, random_values(g, c.head_dim)),
                             key_pool,
                             value_pool,
                             i32_in("positions", {rows}, positions),
                             i32_in("slot_mapping", {rows}, slots),
                             i32_in("row_sequence", {rows}, row_sequence),
                             i32_in("block_tables", {rows, c.table_blocks}, tables),
                             act_out("out", {rows, shape.q_dim()})};
        },
        [shape, theta](Backend& b, const Tensors& t) {
          b.decode_attention(t[0], t[1], t[2], t[3], t[4], AttentionTables{t[5], t[6], t[7], t[8]}, shape, kEps,
                             theta, t[9]);
        },
        [=](const HostTensors& t) {
          std::vector<Expected> expected(3);  // key_pool, value_pool, out
          for (int which = 0; which < 2; ++which) {
            expected[which].values = to_double(t[3 + which].values);
            expected[which].scale = absolute(expected[which].values);
          }
          // The pools after the stores, as floats (what attention reads), and the rotated q heads.
          std::vector<float> keys = t[3].values, values = t[4].values;
          std::vector<std::vector<float>> rotated_q(static_cast<size_t>(rows * c.heads));
          std::vector<double> normed(static_cast<size_t>(c.head_dim)), rotated(normed.size()), magnitude(normed.size());
          const auto rotate = [&](const float* x, const std::vector<float>& weight, int32_t position) {
            reference_rms_norm_row(x, weight.data(), c.head_dim, kEps, normed.data());
            reference_rope_head(normed.data(), c.head_dim, position, theta, rotated.data(), magnitude.data());
          };
          for (int64_t r = 0; r < rows; ++r) {
            const float* qkv_row = &t[0].values[r * shape.qkv_dim()];
            for (int64_t h = 0; h < c.heads; ++h) {
              rotate(qkv_row + h * c.head_dim, t[1].values, t[5].ints[r]);
              rotated_q[r * c.heads + h].assign(rotated.begin(), rotated.end());
            }
            const int32_t slot = t[6].ints[r];
            if (slot < 0) continue;
            for (int64_t kv = 0; kv < c.kv_heads; ++kv) {
              rotate(qkv_row + shape.q_dim() + kv * c.head_dim, t[2].values, t[5].ints[r]);
              const int64_t at = (int64_t{slot} * c.kv_heads + kv) * c.head_dim;
              for (int64_t d = 0; d < c.head_dim; ++d) {
                expected[0].values[at + d] = rotated[d];
                expected[0].scale[at + d] = magnitude[d];
                keys[at + d] = static_cast<float>(rotated[d]);
                const float v = qkv_row[shape.q_dim() + shape.kv_dim() + kv * c.head_dim + d];
                expected[1].values[at + d] = v;
                expected[1].scale[at + d] = std::abs(v);
                values[at + d] = v;
              }
            }
          }
          Expected& out = expected[2];
          out.values.resize(static_cast<size_t>(rows * shape.q_dim()));
          out.scale.resize(out.values.size());
          const int64_t group = c.heads / c.kv_heads;
          for (int64_t r = 0; r < rows; ++r) {
            const int32_t* block_table = &t[8].ints[t[7].ints[r] * c.table_blocks];
            for (int64_t h = 0; h < c.heads; ++h) {
              std::vector<const float*> key_rows, value_rows;
              for (int64_t p = 0; p <= t[5].ints[r]; ++p) {
                const int64_t slot = int64_t{block_table[p / kKvBlockSize]} * kKvBlockSize + p % kKvBlockSize;
                const int64_t at = (slot * c.kv_heads + h / group) * c.head_dim;
                key_rows.push_back(&keys[at]);
                value_rows.push_back(&values[at]);
              }
              const int64_t at = r * shape.q_dim() + h * c.head_dim;
              reference_attention_head(rotated_q[r * c.heads + h].data(), key_rows, value_rows, c.head_dim,
                                       &out.values[at], &out.scale[at]);
            }
          }
          return expected;
        }});
  }
}

// ---- silu_mul, add, gather_rows, argmax ----

void add_elementwise_cases(std::vector<OpCase>& cases) {
  struct SiluShape {
    int64_t rows, inter;
    float gate_amplitude;  // 20: silu far into both tails (silu(-20) ~ -4e-8, still a normal float)
  };
  for (const SiluShape s : {SiluShape{1, 1, 1.0f}, SiluShape{3, 17, 1.0f}, SiluShape{17, 130, 5.0f},
                            SiluShape{130, 64, 20.0f}, SiluShape{7, 2048, 8.0f}}) {
    cases.push_back(OpCase{
        "silu_mul_" +
            dims_name({s.rows, s.inter, static_cast<int64_t>(s.gate_amplitude)}, {"rows", "inter", "amp"}),
        false,
        // expf (< 1 ulp in glibc, 2 ulp on CUDA), an add, a divide and a multiply: a few ulp.
        {1e-6, 2e-6, 4e-3},
        [s](std::mt19937_64& g) {
          std::vector<float> gate_up = random_values(g, s.rows * 2 * s.inter);
          for (int64_t r = 0; r < s.rows; ++r)
            for (int64_t i = 0; i < s.inter; ++i) gate_up[r * 2 * s.inter + i] *= s.gate_amplitude;
          return HostTensors{act_in("gate_up", {s.rows, 2 * s.inter}, gate_up),
                             act_out("out", {s.rows, s.inter})};
        },
        [](Backend& b, const Tensors& t) { b.silu_mul(t[0], t[1]); },
        [s](const HostTensors& t) {
          Expected out;
          for (int64_t r = 0; r < s.rows; ++r) {
            for (int64_t i = 0; i < s.inter; ++i) {
              const float* row = &t[0].values[r * 2 * s.inter];
              out.values.push_back(reference_silu(row[i]) * row[s.inter + i]);
            }
          }
          out.scale = absolute(out.values);
          return std::vector<Expected>{out};
        }});
  }

  struct RowsShape {
    int64_t rows, dim;
  };
  for (const RowsShape s : {RowsShape{1, 1}, RowsShape{3, 17}, RowsShape{130, 3}, RowsShape{1, 100003}}) {
    cases.push_back(
        OpCase{"add_" + dims_name({s.rows, s.dim}, {"rows", "dim"}),
               false,
               // One correctly rounded fp32 add (<= 2^-24 of |x| + |y|), the same on every backend; bf16: the
               // sum rounded to bf16.
               {1e-7, 0.0, 4e-3},
               [s](std::mt19937_64& g) {
                 HostTensor y = act_in("y", {s.rows, s.dim}, random_values(g, s.rows * s.dim));
                 y.output = true;
                 return HostTensors{act_in("x", {s.rows, s.dim}, random_values(g, s.rows * s.dim)), y};
               },
               [](Backend& b, const Tensors& t) { b.add(t[0], t[1]); },
               [](const HostTensors& t) {
                 Expected y;
                 for (size_t i = 0; i < t[0].values.size(); ++i) {
                   y.values.push_back(static_cast<double>(t[1].values[i]) + t[0].values[i]);
                   y.scale.push_back(std::abs(t[1].values[i]) + std::abs(t[0].values[i]));
                 }
                 return std::vector<Expected>{y};
               }});
  }

  struct GatherShape {
    int64_t rows, dim, picks;
  };
  for (const GatherShape s : {GatherShape{1, 1, 1}, GatherShape{5, 3, 7}, GatherShape{130, 64, 200}}) {
    cases.push_back(OpCase{"gather_rows_" + dims_name({s.rows, s.dim, s.picks}, {"rows", "dim", "picks"}),
                           false,
                           {0.0, 0.0, 0.0},  // row copies: exact
                           [s](std::mt19937_64& g) {
                             std::uniform_int_distribution<int32_t> row(0, static_cast<int32_t>(s.rows - 1));
                             std::vector<int32_t> index(static_cast<size_t>(s.picks));
                             for (int32_t& i : index) i = row(g);  // repeats and any order
                             return HostTensors{
                                 act_in("x", {s.rows, s.dim}, random_values(g, s.rows * s.dim)),
                                 i32_in("index", {s.picks}, index), act_out("out", {s.picks, s.dim})};
                           },
                           [](Backend& b, const Tensors& t) { b.gather_rows(t[0], t[1], t[2]); },
                           [s](const HostTensors& t) {
                             Expected out;
                             for (int32_t i : t[1].ints)
                               for (int64_t d = 0; d < s.dim; ++d)
                                 out.values.push_back(t[0].values[i * s.dim + d]);
                             out.scale = absolute(out.values);
                             return std::vector<Expected>{out};
                           }});
  }

  struct ArgmaxShape {
    int64_t rows, vocab;
  };
  // CUDA splits a row into slices of 2048 elements (256 where the row is not whole 16-byte vectors), at
  // most 1024 of them (longer slices past that): one slice and a bit (2049), the odd Qwen3 vocabulary
  // plus one (scalar loads), and rows past 1024 slices in both variants.
  for (const ArgmaxShape s : {ArgmaxShape{1, 1}, ArgmaxShape{3, 17}, ArgmaxShape{17, 1000}, ArgmaxShape{2, 2049},
                              ArgmaxShape{5, 151936}, ArgmaxShape{4, 151937}, ArgmaxShape{1, 2100000},
                              ArgmaxShape{1, 2100001}}) {
    cases.push_back(
        OpCase{"argmax_" + dims_name({s.rows, s.vocab}, {"rows", "vocab"}),
               false,
               {0.0, 0.0, 0.0},  // ids: exact
               [s](std::mt19937_64& g) {
                 std::vector<float> logits = random_values(g, s.rows * s.vocab);
                 // Every other row gets two equal maxima (2.0, exact in bf16): the lower id must win.
                 std::uniform_int_distribution<int64_t> column(0, s.vocab - 1);
                 for (int64_t r = 0; r < s.rows; ++r) {
                   logits[r * s.vocab + column(g)] = 2.0f;
                   if (r % 2 == 0) logits[r * s.vocab + column(g)] = 2.0f;
                 }
                 return HostTensors{act_in("logits", {s.rows, s.vocab}, logits), i32_out("ids", {s.rows})};
               },
               [](Backend& b, const Tensors& t) { b.argmax(t[0], t[1]); },
               [s](const HostTensors& t) {
                 Expected ids;
                 for (int64_t r = 0; r < s.rows; ++r) {
                   const float* row = &t[0].values[r * s.vocab];
                   ids.ints.push_back(
                       static_cast<int32_t>(std::max_element(row, row + s.vocab) - row));  // first maximum
                 }
                 return std::vector<Expected>{ids};
               }});
  }

  // Rows holding a NaN, +Inf or -Inf (among finite rows) must give -1, whatever the column of the
  // bad value: the first, the last or in between. A -Inf or NaN never wins a plain comparison, so
  // an argmax that only looks at its winner would return a finite row's id; finite rows keep theirs.
  for (const ArgmaxShape s :
       {ArgmaxShape{12, 17}, ArgmaxShape{12, 1000}, ArgmaxShape{12, 151936}, ArgmaxShape{12, 151937}}) {
    cases.push_back(OpCase{
        "argmax_non_finite_" + dims_name({s.rows, s.vocab}, {"rows", "vocab"}),
        false,
        {0.0, 0.0, 0.0},  // ids: exact
        [s](std::mt19937_64& g) {
          std::vector<float> logits = random_values(g, s.rows * s.vocab);
          std::uniform_int_distribution<int64_t> column(0, s.vocab - 1);
          const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                                      std::numeric_limits<float>::infinity(),
                                      -std::numeric_limits<float>::infinity()};
          for (int64_t r = 0; r < s.rows; ++r) {
            logits[r * s.vocab + column(g)] = 2.0f;  // a finite maximum in every row
            const int64_t kind = r % 4;              // 0: finite, 1: NaN, 2: +Inf, 3: -Inf
            if (kind == 0) continue;
            const int64_t where = (r / 4) % 3;  // 0: first column, 1: last, 2: random
            const int64_t at = where == 0 ? 0 : where == 1 ? s.vocab - 1 : column(g);
            logits[r * s.vocab + at] = bad_values[kind - 1];
          }
          return HostTensors{act_in("logits", {s.rows, s.vocab}, logits), i32_out("ids", {s.rows})};
        },
        [](Backend& b, const Tensors& t) { b.argmax(t[0], t[1]); },
        [s](const HostTensors& t) {
          Expected ids;
          for (int64_t r = 0; r < s.rows; ++r) {
            const float* row = &t[0].values[r * s.vocab];
            const bool finite = std::all_of(row, row + s.vocab, [](float v) { return std::isfinite(v); });
            EXPECT_EQ(finite, r % 4 == 0) << "row " << r << ": the case lost its planted value";
            ids.ints.push_back(finite ? static_cast<int32_t>(std::max_element(row, row + s.vocab) - row)
                                      : -1);
          }
          return std::vector<Expected>{ids};
        }});
  }
}

// ---- scoring: log_softmax, score_rows (epic eval's figures) ----

// Logits of one row per position with |v| in [0.3, 6] (peaked distributions, like a model's) and a
// planted maximum of 9.0 in every row, a second one (a tie: the lower id must win) in every other row.
std::vector<float> scoring_logits(std::mt19937_64& g, int64_t rows, int64_t vocab) {
  std::vector<float> logits = random_values(g, rows * vocab, 6.0f);
  std::uniform_int_distribution<int64_t> column(0, vocab - 1);
  for (int64_t r = 0; r < rows; ++r) {
    logits[r * vocab + column(g)] = 9.0f;
    if (r % 2 == 0) logits[r * vocab + column(g)] = 9.0f;
  }
  return logits;
}

// log(sum(exp(row))) in double.
double reference_log_sum_exp(const float* row, int64_t vocab) {
  const double max = *std::max_element(row, row + vocab);
  double sum = 0.0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - max);
  return max + std::log(sum);
}

// The spacing of floats at |value|: the op rounds each row's log-sum-exp to fp32 (backend.h), and two
// backends may round a double a hair apart to neighbouring floats.
double float_ulp(double value) {
  const auto magnitude = static_cast<float>(std::abs(value));
  return static_cast<double>(std::nextafter(magnitude, INFINITY) - magnitude);
}

void add_scoring_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t rows, vocab;
  };
  // CUDA reads 8-element vectors where the vocabulary is a multiple of 8 (1000, 151936, 24: fewer than a
  // block's threads) and scalars otherwise (151937, 17).
  for (const Shape s : {Shape{1, 151936}, Shape{7, 151937}, Shape{300, 1000}, Shape{3, 17}, Shape{2, 24}}) {
    cases.push_back(
        OpCase{"log_softmax_" + dims_name({s.rows, s.vocab}, {"rows", "vocab"}),
               false,
               // One fp32 rounding of x - lse, and lse itself off by the float exp's ulp in a few terms:
               // 1e-6 of |expected| + 1 (an absolute floor for log-probabilities near 0).
               {1e-6, 1e-6, 1e-6},
               [s](std::mt19937_64& g) {
                 return HostTensors{
                     floats("logits", Role::kF32, {s.rows, s.vocab}, scoring_logits(g, s.rows, s.vocab)),
                     floats("out", Role::kF32, {s.rows, s.vocab}, nan_filled(s.rows * s.vocab), true)};
               },
               [](Backend& b, const Tensors& t) { b.log_softmax(t[0], t[1]); },
               [s](const HostTensors& t) {
                 Expected out;
                 for (int64_t r = 0; r < s.rows; ++r) {
                   const float* row = &t[0].values[r * s.vocab];
                   const double log_sum = reference_log_sum_exp(row, s.vocab);
                   for (int64_t v = 0; v < s.vocab; ++v) out.values.push_back(row[v] - log_sum);
                 }
                 for (const double value : out.values) out.scale.push_back(std::abs(value) + 1.0);
                 return std::vector<Expected>{out};
               }});
  }

  // Even rows: the variant is the reference with small changes (KL ~1e-2, as a pruned model's); odd
  // rows: an unrelated variant (KL of several nats); two rows in three tie for the maximum. Targets: the
  // last and the first id in rows 0 and 1, the row's maximum in row 2, random ids elsewhere.
  constexpr double kScoreTolerance = 1e-6;
  for (const Shape s : {Shape{1, 151936}, Shape{7, 1000}, Shape{7, 151937}, Shape{300, 1000},
                        Shape{300, 151936}, Shape{3, 17}, Shape{2, 24}}) {
    cases.push_back(OpCase{
        "score_rows_" + dims_name({s.rows, s.vocab}, {"rows", "vocab"}),
        false,
        // log-sum-exp: 1e-6 of itself (fp32 rounding, ~6e-8). Target logit: a copy, exact (scale 0). KL:
        // 1e-6 of sum_v |term_v| (fp32 terms, expf's ulp) plus two ulps of the row's fp32 log-sum-exp
        // times sum_v p_ref (= 1): that rounding may differ between backends by one float.
        {kScoreTolerance, kScoreTolerance, kScoreTolerance},
        [s](std::mt19937_64& g) {
          const std::vector<float> reference_logits = scoring_logits(g, s.rows, s.vocab);
          std::vector<float> logits = scoring_logits(g, s.rows, s.vocab);
          const std::vector<float> nudges = random_values(g, s.rows * s.vocab, 0.3f);
          std::vector<float> reference_log_probs(reference_logits.size());
          std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(s.vocab - 1));
          std::vector<int32_t> targets(static_cast<size_t>(s.rows));
          for (int64_t r = 0; r < s.rows; ++r) {
            const float* reference_row = &reference_logits[r * s.vocab];
            const double log_sum = reference_log_sum_exp(reference_row, s.vocab);
            for (int64_t v = 0; v < s.vocab; ++v) {
              const int64_t i = r * s.vocab + v;
              reference_log_probs[i] = static_cast<float>(reference_row[v] - log_sum);
              if (r % 2 == 0) logits[i] = reference_row[v] + nudges[i];
            }
            // Two rows in three get a tie for the maximum in two distinct columns.
            if (r % 3 != 2) {
              const int32_t first = id(g),
                            second = static_cast<int32_t>((first + 1 + id(g) % (s.vocab - 1)) % s.vocab);
              logits[r * s.vocab + first] = logits[r * s.vocab + second] = 12.0f;
            }
            const float* row = &logits[r * s.vocab];
            targets[r] = r == 0   ? static_cast<int32_t>(s.vocab - 1)
                         : r == 1 ? 0
                         : r == 2 ? static_cast<int32_t>(std::max_element(row, row + s.vocab) - row)
                                  : id(g);
          }
          return HostTensors{
              floats("logits", Role::kF32, {s.rows, s.vocab}, logits), i32_in("targets", {s.rows}, targets),
              floats("reference_log_probs", Role::kF32, {s.rows, s.vocab}, reference_log_probs),
              floats("scores", Role::kF32, {s.rows, kNumRowScores}, nan_filled(s.rows * kNumRowScores), true),
              i32_out("ids", {s.rows})};
        },
        [](Backend& b, const Tensors& t) { b.score_rows(t[0], t[1], t[2], t[3], t[4]); },
        [s](const HostTensors& t) {
          Expected scores, ids;
          for (int64_t r = 0; r < s.rows; ++r) {
            const float* row = &t[0].values[r * s.vocab];
            const float* reference = &t[2].values[r * s.vocab];
            const double log_sum = reference_log_sum_exp(row, s.vocab);
            // The op's log-probabilities are logits - the fp32 log-sum-exp (backend.h).
            const double log_sum_f32 = static_cast<float>(log_sum);
            double kl = 0.0, magnitude = 0.0;
            for (int64_t v = 0; v < s.vocab; ++v) {
              const double term = std::exp(double(reference[v])) * (reference[v] - (row[v] - log_sum_f32));
              kl += term;
              magnitude += std::abs(term);
            }
            const int32_t target = t[1].ints[r];
            scores.values.insert(scores.values.end(), {log_sum, double(row[target]), std::max(kl, 0.0)});
            scores.scale.insert(scores.scale.end(), {std::abs(log_sum), 0.0,
                                                     magnitude + 2.0 * float_ulp(log_sum) / kScoreTolerance});
            ids.ints.push_back(
                static_cast<int32_t>(std::max_element(row, row + s.vocab) - row));  // first maximum
          }
          return std::vector<Expected>{scores, ids};
        }});
  }
}

// ---- MoE: route_top_k, group_by_expert, expert_ffn, combine_top_k ----

enum class Present { kAll, kEveryThirdAbsent, kEveryThirdAbsentHigh, kExactlyTopK, kRandomHalf };
enum class Logits { kSeparated, kLargeOffset, kAllEqual };

void add_route_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t tokens, experts, top_k;
    bool normalize;
    Present present;
    Logits logits;
    const char* what;
    bool per_row_k = false;  // row_top_k: each token its own k in [1, top_k] (a residency state per request)
  };
  const std::vector<Shape> shapes = {
      {1, 1, 1, true, Present::kAll, Logits::kSeparated, "one_expert"},
      {3, 17, 3, false, Present::kEveryThirdAbsent, Logits::kSeparated, "third_absent"},
      {17, 128, 8, true, Present::kAll, Logits::kSeparated, "qwen3"},
      {5, 128, 8, false, Present::kEveryThirdAbsentHigh, Logits::kSeparated, "absent_have_top_logits"},
      {130, 128, 8, true, Present::kExactlyTopK, Logits::kSeparated, "exactly_k_present"},
      {4, 60, 4, true, Present::kRandomHalf, Logits::kLargeOffset, "offset1000"},
      {3, 128, 8, true, Present::kAll, Logits::kAllEqual, "ties"},
      {2, 130, 1, false, Present::kEveryThirdAbsent, Logits::kAllEqual, "ties_absent"},
      // The CUDA router keeps a token's choices in one warp: top_k up to 32.
      {1, 32, 32, true, Present::kAll, Logits::kSeparated, "k_is_all"},
      {9, 128, 8, true, Present::kAll, Logits::kSeparated, "per_row_k", true},
      {7, 60, 4, false, Present::kRandomHalf, Logits::kSeparated, "per_row_k", true},
      {5, 128, 8, true, Present::kAll, Logits::kAllEqual, "per_row_k_ties", true},
  };
  for (const Shape s : shapes) {
    cases.push_back(OpCase{
        std::string("route_top_k_") + s.what + "_" +
            dims_name({s.tokens, s.experts, s.top_k}, {"tokens", "experts", "k"}) +
            (s.normalize ? "_norm" : "_raw"),
        false,
        // Logits 0.05 apart make probabilities differ by 5%, far above fp32 noise, so the ids must
        // match exactly; exact ties resolve to the lower id. Weights: fp32 exp and sums of up to 128
        // terms: measured up to 5e-7 from double; the GPU's expf is within 2 ulp. Logits stay f32
        // with bf16 activations (the router linear writes f32).
        {2e-6, 3e-6, 3e-6},
        [s](std::mt19937_64& g) {
          std::vector<uint8_t> present(static_cast<size_t>(s.experts), 1);
          if (s.present == Present::kEveryThirdAbsent || s.present == Present::kEveryThirdAbsentHigh) {
            for (int64_t e = 0; e < s.experts; e += 3) present[e] = 0;
          } else if (s.present == Present::kExactlyTopK) {
            std::fill(present.begin(), present.end(), 0);
            for (int64_t j = 0; j < s.top_k; ++j) present[j * s.experts / s.top_k] = 1;
          } else if (s.present == Present::kRandomHalf) {
            std::bernoulli_distribution coin(0.5);
            do {
              for (uint8_t& p : present) p = coin(g) ? 1 : 0;
            } while (std::count(present.begin(), present.end(), 1) < s.top_k);
          }
          std::vector<float> logits(static_cast<size_t>(s.tokens * s.experts));
          std::vector<int> rank(static_cast<size_t>(s.experts));
          std::uniform_real_distribution<float> offset(-2.0f, 2.0f);
          for (int64_t t = 0; t < s.tokens; ++t) {
            std::iota(rank.begin(), rank.end(), 0);
            std::shuffle(rank.begin(), rank.end(), g);
            const float base = offset(g) + (s.logits == Logits::kLargeOffset ? 1000.0f : 0.0f);
            for (int64_t e = 0; e < s.experts; ++e) {
              float& logit = logits[t * s.experts + e];
              logit = s.logits == Logits::kAllEqual ? 0.5f : base + 0.05f * static_cast<float>(rank[e]);
              if (s.present == Present::kEveryThirdAbsentHigh && present[e] == 0) logit = 100.0f;
            }
          }
          HostTensor present_tensor = blank("present", Role::kU8, {s.experts});
          present_tensor.bytes = present;
          HostTensor weights =
              floats("weights", Role::kF32, {s.tokens, s.top_k}, nan_filled(s.tokens * s.top_k), true);
          HostTensors tensors{floats("logits", Role::kF32, {s.tokens, s.experts}, logits), present_tensor,
                              i32_out("expert_ids", {s.tokens, s.top_k}), weights};
          if (s.per_row_k) {
            // Every k from 1 to top_k among the tokens (the first two: 1 and top_k), the rest random.
            std::vector<int32_t> row_k(static_cast<size_t>(s.tokens));
            std::uniform_int_distribution<int32_t> pick(1, static_cast<int32_t>(s.top_k));
            for (int64_t t = 0; t < s.tokens; ++t)
              row_k[t] = t == 0 ? 1 : t == 1 ? static_cast<int32_t>(s.top_k) : pick(g);
            tensors.push_back(i32_in("row_top_k", {s.tokens}, row_k));
          }
          return tensors;
        },
        [s](Backend& b, const Tensors& t) {
          b.route_top_k(t[0], t[1], t[2], t[3], s.normalize, s.per_row_k ? t[4] : Tensor{});
        },
        [s](const HostTensors& t) {
          std::vector<Expected> out(2);
          out[0].ints.resize(static_cast<size_t>(s.tokens * s.top_k));
          out[1].values.resize(out[0].ints.size());
          if (!s.per_row_k) {
            reference_route_top_k(t[0].values.data(), t[1].bytes.data(), s.tokens, s.experts, s.top_k,
                                  s.normalize, out[0].ints.data(), out[1].values.data());
          } else {
            // Token t as route_top_k with k = row_top_k[t] alone, then padding: its first choice, weight 0.
            for (int64_t token = 0; token < s.tokens; ++token) {
              const int64_t own_k = t[4].ints[token];
              std::vector<int32_t> ids(static_cast<size_t>(own_k));
              std::vector<double> weights(ids.size());
              reference_route_top_k(t[0].values.data() + token * s.experts, t[1].bytes.data(), 1, s.experts,
                                    own_k, s.normalize, ids.data(), weights.data());
              for (int64_t j = 0; j < s.top_k; ++j) {
                out[0].ints[token * s.top_k + j] = j < own_k ? ids[j] : ids[0];
                out[1].values[token * s.top_k + j] = j < own_k ? weights[j] : 0.0;
              }
            }
          }
          out[1].scale = absolute(out[1].values);
          return out;
        }});
  }
}

void add_group_by_expert_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t tokens, experts, top_k, used_experts;  // ids drawn from used_experts random experts
  };
  // From 16384 slots (and up to 1024 experts) CUDA sorts over many blocks: a partial last segment,
  // 1000 experts of which 300 unused, and 1100 experts (past that path's cap: one block again).
  for (const Shape s : {Shape{1, 4, 1, 4}, Shape{3, 8, 2, 3}, Shape{17, 128, 8, 128}, Shape{130, 60, 4, 20},
                        Shape{1, 128, 8, 128}, Shape{2100, 128, 8, 128}, Shape{5000, 1000, 4, 700},
                        Shape{4200, 1100, 4, 1100}}) {
    cases.push_back(OpCase{
        "group_by_expert_" +
            dims_name({s.tokens, s.experts, s.top_k, s.used_experts}, {"tokens", "experts", "k", "used"}),
        false,
        {0.0, 0.0, 0.0},  // a permutation: exact
        [s](std::mt19937_64& g) {
          std::vector<int32_t> experts(static_cast<size_t>(s.experts));
          std::iota(experts.begin(), experts.end(), 0);
          std::shuffle(experts.begin(), experts.end(), g);
          std::uniform_int_distribution<int64_t> pick(0, s.used_experts - 1);
          std::vector<int32_t> ids(static_cast<size_t>(s.tokens * s.top_k));
          for (int32_t& id : ids) id = experts[pick(g)];  // repeats within a token too
          return HostTensors{
              i32_in("expert_ids", {s.tokens, s.top_k}, ids), i32_out("expert_offsets", {s.experts + 1}),
              i32_out("source_row", {s.tokens * s.top_k}), i32_out("sorted_position", {s.tokens * s.top_k})};
        },
        [s](Backend& b, const Tensors& t) { b.group_by_expert(t[0], s.experts, s.top_k, t[1], t[2], t[3]); },
        [s](const HostTensors& t) {
          std::vector<Expected> out(3);
          std::vector<int32_t> order(t[0].ints.size());
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(),
                           [&](int32_t a, int32_t b) { return t[0].ints[a] < t[0].ints[b]; });
          for (int64_t e = 0; e <= s.experts; ++e) {
            out[0].ints.push_back(static_cast<int32_t>(
                std::count_if(t[0].ints.begin(), t[0].ints.end(), [e](int32_t id) { return id < e; })));
          }
          out[2].ints.resize(order.size());
          for (size_t i = 0; i < order.size(); ++i) {
            out[1].ints.push_back(static_cast<int32_t>(order[i] / s.top_k));
            out[2].ints[order[i]] = static_cast<int32_t>(i);
          }
          return out;
        }});
  }
}

// One row through one expert's SwiGLU FFN in double: y[o] and the scale its error is measured
// against, sum_i |down_oi| (|h_i| + |silu(g_i)| sum |x w_up| + |up_i| sum |x w_gate|), the magnitudes
// whose fp32 roundings reach y. gate_up [2I, H] (gate rows first), down [H, I].
void reference_expert_row(const float* x, const float* gate_up_weights, const float* down_weights,
                          int64_t hidden, int64_t inter, double* y, double* y_scale) {
  std::vector<double> gate_up(static_cast<size_t>(2 * inter)), magnitude(gate_up.size());
  std::vector<double> h(static_cast<size_t>(inter)), h_scale(h.size());
  reference_linear(x, gate_up_weights, 1, hidden, 2 * inter, gate_up.data(), magnitude.data());
  for (int64_t i = 0; i < inter; ++i) {
    const double silu = reference_silu(gate_up[i]);
    h[i] = silu * gate_up[inter + i];
    h_scale[i] = std::abs(h[i]) + std::abs(silu) * magnitude[inter + i] + std::abs(gate_up[inter + i]) * magnitude[i];
  }
  for (int64_t o = 0; o < hidden; ++o) {
    const float* down_row = &down_weights[o * inter];
    double sum = 0.0, scale = 0.0;
    for (int64_t i = 0; i < inter; ++i) {
      sum += h[i] * down_row[i];
      scale += std::abs(down_row[i]) * h_scale[i];
    }
    y[o] = sum;
    y_scale[o] = scale;
  }
}

// A table of each hosted expert's addresses (Backend::expert_ffn_addressed) over a stack of hosted
// experts: every other one (odd slots) copied into host staging memory (pinned on cuda: the kernels read
// it over the bus, in place), the others left in the stack. Keep it until the ops that read it are done.
struct AddressedExperts {
  std::unique_ptr<Buffer> staging;
  OwnedTensor addresses;  // I64 [experts, 2]

  AddressedExperts(Backend& b, const Tensor& gate_up, const Tensor& down, const Tensor& local_index) {
    const int64_t experts = local_index.dim(0), hosted = gate_up.dim(0);
    const size_t gate_up_bytes = gate_up.bytes() / static_cast<size_t>(hosted);
    const size_t down_bytes = down.bytes() / static_cast<size_t>(hosted);
    std::vector<int32_t> local(static_cast<size_t>(experts));
    b.copy_to_host(local_index, 0, local.data(), local.size() * sizeof(int32_t));
    staging = b.allocate_staging((gate_up_bytes + down_bytes) * static_cast<size_t>(hosted));
    auto* host = static_cast<uint8_t*>(staging->data());
    std::vector<int64_t> table(static_cast<size_t>(2 * experts), 0);
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t slot = local[e];
      if (slot < 0) continue;
      if (slot % 2 == 1) {
        uint8_t* at = host + slot * (gate_up_bytes + down_bytes);
        b.copy_to_host(gate_up, slot * gate_up_bytes, at, gate_up_bytes);
        b.copy_to_host(down, slot * down_bytes, at + gate_up_bytes, down_bytes);
        table[2 * e] = reinterpret_cast<int64_t>(at);
        table[2 * e + 1] = reinterpret_cast<int64_t>(at + gate_up_bytes);
      } else {
        table[2 * e] = reinterpret_cast<int64_t>(static_cast<const uint8_t*>(gate_up.data) + slot * gate_up_bytes);
        table[2 * e + 1] = reinterpret_cast<int64_t>(static_cast<const uint8_t*>(down.data) + slot * down_bytes);
      }
    }
    addresses = b.new_tensor(ScalarType::kI64, {experts, 2});
    b.copy_from_host(addresses.view(), 0, table.data(), table.size() * sizeof(int64_t));
    b.synchronize();
  }
};

// expert_ffn's tensors (x, offsets, gate_up, down, local_index, intermediate, y) through
// expert_ffn_addressed.
void run_expert_ffn_addressed(Backend& b, const Tensors& t) {
  const AddressedExperts experts(b, t[2], t[3], t[4]);
  b.expert_ffn_addressed(t[0], t[1], experts.addresses.view(), t[2].type, t[5], t[6]);
  b.synchronize();
}

void add_expert_ffn_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t experts, hosted, hidden, inter, max_rows_per_expert;
    const char* what;
    int64_t min_rows_per_expert = 0;
  };
  // Groups are ragged (min .. max rows per hosted expert); experts not hosted have no rows; the
  // hosted experts sit in their stack in shuffled order. The last two pass 8192 rows, where CUDA's
  // bf16 rows go to batched cuBLAS GEMMs (expert_ffn_batched.cu: near-equal groups in place over
  // row windows; groups of 350 .. 1400 rows, too uneven for that, in padded buckets, with 2I > H).
  const std::vector<Shape> shapes = {
      {1, 1, 8, 4, 1, "one_row"},
      {4, 4, 16, 8, 5, "all_hosted"},
      {8, 5, 64, 32, 9, "three_not_hosted"},
      {128, 16, 128, 48, 1, "decode"},
      {16, 16, 256, 96, 40, "prefill"},
      {20, 18, 64, 24, 560, "batched_windows", 470},
      {24, 24, 64, 40, 1400, "batched_buckets", 350},
  };
  // Each shape twice: with the stack of hosted experts (expert_ffn), and with each expert at its own
  // address (expert_ffn_addressed, an expert store's table): every other hosted expert copied into host
  // staging memory (pinned on cuda: read over the bus in place), the others left in the stack.
  for (const bool addressed : {false, true})
  for (const Shape s : shapes) {
    cases.push_back(OpCase{
        std::string(addressed ? "expert_ffn_addressed_" : "expert_ffn_") + s.what + "_" +
            dims_name({s.experts, s.hosted, s.hidden, s.inter}, {"experts", "hosted", "hidden", "inter"}),
        true,
        // Scale: sum_i |down_oi| (|h_i| + |silu(g_i)| sum |x w_up| + |up_i| sum |x w_gate|), the
        // magnitudes whose fp32 roundings reach y. bf16 activations: the intermediate is rounded to
        // bf16 before down, and y again.
        {1e-5, 2e-5, 1.6e-2},
        [s](std::mt19937_64& g) {
          std::vector<int32_t> hosted_experts(static_cast<size_t>(s.experts));
          std::iota(hosted_experts.begin(), hosted_experts.end(), 0);
          std::shuffle(hosted_experts.begin(), hosted_experts.end(), g);
          hosted_experts.resize(static_cast<size_t>(s.hosted));
          std::vector<int32_t> local_index(static_cast<size_t>(s.experts), -1);
          for (size_t slot = 0; slot < hosted_experts.size(); ++slot)
            local_index[hosted_experts[slot]] = slot;
          std::uniform_int_distribution<int64_t> group_rows(s.min_rows_per_expert, s.max_rows_per_expert);
          std::vector<int32_t> offsets(1, 0);
          for (int64_t e = 0; e < s.experts; ++e) {
            const int64_t n = local_index[e] < 0 ? 0 : (s.experts == 1 ? 1 : group_rows(g));
            offsets.push_back(static_cast<int32_t>(offsets.back() + n));
          }
          const int64_t rows = offsets.back();
          // Weights ~ 1/sqrt(fan-in) so activations stay O(1) through silu.
          const float gate_up_scale = 1.0f / std::sqrt(static_cast<float>(s.hidden));
          const float down_scale = 1.0f / std::sqrt(static_cast<float>(s.inter));
          return HostTensors{act_in("x", {rows, s.hidden}, random_values(g, rows * s.hidden, 2.0f)),
                             i32_in("expert_offsets", {s.experts + 1}, offsets),
                             weight_in("gate_up", {s.hosted, 2 * s.inter, s.hidden},
                                       random_values(g, s.hosted * 2 * s.inter * s.hidden, gate_up_scale)),
                             weight_in("down", {s.hosted, s.hidden, s.inter},
                                       random_values(g, s.hosted * s.hidden * s.inter, down_scale)),
                             i32_in("local_index", {s.experts}, local_index),
                             floats("intermediate", Role::kActivation, {rows, s.inter},
                                    nan_filled(rows * s.inter)),  // scratch
                             act_out("y", {rows, s.hidden})};
        },
        [addressed](Backend& b, const Tensors& t) {
          if (addressed) {
            run_expert_ffn_addressed(b, t);
          } else {
            b.expert_ffn(t[0], t[1], t[2], t[3], t[4], t[5], t[6]);
          }
        },
        [s](const HostTensors& t) {
          const int64_t rows = t[0].shape[0];
          Expected y;
          y.values.resize(static_cast<size_t>(rows * s.hidden));
          y.scale.resize(y.values.size());
          for (int64_t e = 0; e < s.experts; ++e) {
            for (int64_t r = t[1].ints[e]; r < t[1].ints[e + 1]; ++r) {
              const int64_t slot = t[4].ints[e];
              reference_expert_row(&t[0].values[r * s.hidden], &t[2].values[slot * 2 * s.inter * s.hidden],
                                   &t[3].values[slot * s.hidden * s.inter], s.hidden, s.inter,
                                   &y.values[r * s.hidden], &y.scale[r * s.hidden]);
            }
          }
          return std::vector<Expected>{y};
        }});
  }
}

void add_combine_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t tokens, top_k, hidden;
  };
  // The sum may also be written in f32 whatever expert_out is (the runner's fp32 residual stream).
  for (const bool f32_out : {false, true})
  for (const Shape s : {Shape{1, 1, 4}, Shape{3, 2, 17}, Shape{17, 8, 130}, Shape{130, 8, 64}}) {
    cases.push_back(OpCase{
        std::string(f32_out ? "combine_top_k_f32_out_" : "combine_top_k_") +
            dims_name({s.tokens, s.top_k, s.hidden}, {"tokens", "k", "hidden"}),
        false,
        // k fp32 products and sums in slot order: <= (k + 1) 2^-24 of sum |w_j x_j|; bf16: the
        // result rounded to bf16 (f32 out: the fp32 sum of the bf16 inputs).
        {1e-6, 1e-6, f32_out ? 1e-6 : 4e-3},
        [s, f32_out](std::mt19937_64& g) {
          const int64_t slots = s.tokens * s.top_k;
          std::vector<int32_t> sorted_position(static_cast<size_t>(slots));
          std::iota(sorted_position.begin(), sorted_position.end(), 0);
          std::shuffle(sorted_position.begin(), sorted_position.end(), g);
          std::vector<float> weights = random_values(g, slots);
          for (float& w : weights) w = std::abs(w);
          return HostTensors{act_in("expert_out", {slots, s.hidden}, random_values(g, slots * s.hidden)),
                             i32_in("sorted_position", {slots}, sorted_position),
                             floats("weights", Role::kF32, {s.tokens, s.top_k}, weights),
                             f32_out ? floats("out", Role::kF32, {s.tokens, s.hidden},
                                              nan_filled(s.tokens * s.hidden), true)
                                     : act_out("out", {s.tokens, s.hidden})};
        },
        [](Backend& b, const Tensors& t) { b.combine_top_k(t[0], t[1], t[2], t[3]); },
        [s](const HostTensors& t) {
          Expected out;
          for (int64_t token = 0; token < s.tokens; ++token) {
            for (int64_t i = 0; i < s.hidden; ++i) {
              double sum = 0.0, scale = 0.0;
              for (int64_t j = 0; j < s.top_k; ++j) {
                const double term = static_cast<double>(t[2].values[token * s.top_k + j]) *
                                    t[0].values[t[1].ints[token * s.top_k + j] * s.hidden + i];
                sum += term;
                scale += std::abs(term);
              }
              out.values.push_back(sum);
              out.scale.push_back(scale);
            }
          }
          return std::vector<Expected>{out};
        }});
  }
}

// Backend::routed_moe: the whole block against a double reference (CPU) and against the CPU
// backend's ops one by one (CUDA: the fused kernels for one bf16 token with H and I multiples of 8,
// the ops one by one otherwise: 3 tokens, H 36, and every f32 run).
void add_routed_moe_cases(std::vector<OpCase>& cases) {
  struct Shape {
    int64_t tokens, experts, top_k, hidden, inter;
    bool normalize, every_third_absent;
    const char* what;
  };
  const std::vector<Shape> shapes = {
      {1, 128, 8, 256, 96, true, false, "qwen3_decode"},
      {1, 60, 4, 64, 40, false, true, "third_absent"},
      {1, 200, 16, 128, 48, true, false, "k16_wide_router"},
      {3, 60, 4, 64, 40, false, true, "three_tokens"},
      {1, 8, 2, 36, 24, true, false, "hidden36"},
  };
  // f32 or activation-type out; the experts in a stack, or at their own addresses (AddressedExperts).
  for (const bool addressed : {false, true})
  for (const bool f32_out : {false, true}) {
    for (const Shape s : shapes) {
      const int64_t slots = s.tokens * s.top_k;
      cases.push_back(OpCase{
          std::string(f32_out ? "routed_moe_f32_out_" : "routed_moe_") + (addressed ? "addressed_" : "") + s.what + "_" +
              dims_name({s.tokens, s.experts, s.top_k, s.hidden, s.inter}, {"tokens", "experts", "k", "hidden", "inter"}),
          true,
          // expert_ffn's and combine_top_k's together (bf16: the intermediate, each slot's row and the
          // sum rounded); the routing weights as route_top_k's. An f32 out with bf16 activations
          // carries the bf16 roundings of the rows it sums, so there the weights share its bound.
          {1e-5, 2e-5, 2e-2, f32_out ? 2e-2 : 3e-6},
          [s, slots, f32_out](std::mt19937_64& g) {
            std::vector<uint8_t> present(static_cast<size_t>(s.experts), 1);
            if (s.every_third_absent)
              for (int64_t e = 0; e < s.experts; e += 3) present[e] = 0;
            // Hosted: every present expert, in shuffled order in the weight stack.
            std::vector<int32_t> hosted;
            for (int64_t e = 0; e < s.experts; ++e)
              if (present[e]) hosted.push_back(static_cast<int32_t>(e));
            std::shuffle(hosted.begin(), hosted.end(), g);
            std::vector<int32_t> local_index(static_cast<size_t>(s.experts), -1);
            for (size_t slot = 0; slot < hosted.size(); ++slot) local_index[hosted[slot]] = static_cast<int32_t>(slot);
            const auto num_hosted = static_cast<int64_t>(hosted.size());
            // Router inputs and weights drawn until, with f32 and with bf16 router weights alike,
            // every token's k + 1 largest present logits are 1e-3 apart: far above fp32 rounding, so
            // the choice and order are the same on every backend (ties are route_top_k's cases).
            std::vector<float> router_input, router;
            const auto separated = [&](const std::vector<float>& w) {
              std::vector<double> logits(static_cast<size_t>(s.experts)), magnitude(logits.size());
              for (int64_t t = 0; t < s.tokens; ++t) {
                reference_linear(&router_input[t * s.hidden], w.data(), 1, s.hidden, s.experts, logits.data(),
                                 magnitude.data());
                std::vector<double> sorted;
                for (int64_t e = 0; e < s.experts; ++e)
                  if (present[e]) sorted.push_back(logits[e]);
                std::sort(sorted.rbegin(), sorted.rend());
                for (int64_t j = 0; j < s.top_k && j + 1 < static_cast<int64_t>(sorted.size()); ++j)
                  if (sorted[j] - sorted[j + 1] < 1e-3) return false;
              }
              return true;
            };
            for (int attempt = 0;; ++attempt) {
              if (attempt == 1000) throw std::runtime_error("routed_moe case: no separated router draw");
              router_input = random_values(g, s.tokens * s.hidden);
              router = random_values(g, s.experts * s.hidden, 4.0f / std::sqrt(static_cast<float>(s.hidden)));
              std::vector<float> rounded = router;
              round_to_bf16(rounded);
              if (separated(router) && separated(rounded)) break;
            }
            HostTensor present_tensor = blank("present", Role::kU8, {s.experts});
            present_tensor.bytes = present;
            const float gate_up_scale = 1.0f / std::sqrt(static_cast<float>(s.hidden));
            const float down_scale = 1.0f / std::sqrt(static_cast<float>(s.inter));
            const auto scratch = [](const char* name, Role role, std::vector<int64_t> shape) {
              return floats(name, role, shape, nan_filled(numel(shape)));
            };
            const auto int_scratch = [](const char* name, int64_t n) {
              return i32_in(name, {n}, std::vector<int32_t>(static_cast<size_t>(n), -12345));
            };
            return HostTensors{
                floats("router_input", Role::kF32, {s.tokens, s.hidden}, router_input),
                act_in("x", {s.tokens, s.hidden}, random_values(g, s.tokens * s.hidden, 2.0f)),
                weight_in("router", {s.experts, s.hidden}, router),
                present_tensor,
                weight_in("gate_up", {num_hosted, 2 * s.inter, s.hidden},
                          random_values(g, num_hosted * 2 * s.inter * s.hidden, gate_up_scale)),
                weight_in("down", {num_hosted, s.hidden, s.inter},
                          random_values(g, num_hosted * s.hidden * s.inter, down_scale)),
                i32_in("local_index", {s.experts}, local_index),
                scratch("logits", Role::kF32, {s.tokens, s.experts}),
                i32_out("expert_ids", {s.tokens, s.top_k}),
                floats("weights", Role::kF32, {s.tokens, s.top_k}, nan_filled(slots), true),
                int_scratch("expert_offsets", s.experts + 1),
                int_scratch("source_row", slots),
                int_scratch("sorted_position", slots),
                scratch("sorted_rows", Role::kActivation, {slots, s.hidden}),
                scratch("intermediate", Role::kActivation, {slots, s.inter}),
                scratch("expert_out", Role::kActivation, {slots, s.hidden}),
                f32_out ? floats("out", Role::kF32, {s.tokens, s.hidden}, nan_filled(s.tokens * s.hidden), true)
                        : act_out("out", {s.tokens, s.hidden})};
          },
          [s, addressed](Backend& b, const Tensors& t) {
            const RoutedMoeScratch scratch{t[7], t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15]};
            if (!addressed) {
              b.routed_moe(t[0], t[1],
                           RoutedMoeWeights{t[2], t[3], t[4], t[5], t[6], s.normalize, Tensor{}, ScalarType::kBF16},
                           scratch, t[16]);
              return;
            }
            const AddressedExperts experts(b, t[4], t[5], t[6]);
            b.routed_moe(t[0], t[1],
                         RoutedMoeWeights{t[2], t[3], Tensor{}, Tensor{}, Tensor{}, s.normalize,
                                          experts.addresses.view(), t[4].type},
                         scratch, t[16]);
            b.synchronize();
          },
          [s, slots](const HostTensors& t) {
            std::vector<double> logits(static_cast<size_t>(s.tokens * s.experts)), magnitude(logits.size());
            reference_linear(t[0].values.data(), t[2].values.data(), s.tokens, s.hidden, s.experts, logits.data(),
                             magnitude.data());
            const std::vector<float> logits_f32(logits.begin(), logits.end());
            std::vector<Expected> out(3);
            out[0].ints.resize(static_cast<size_t>(slots));
            out[1].values.resize(out[0].ints.size());
            reference_route_top_k(logits_f32.data(), t[3].bytes.data(), s.tokens, s.experts, s.top_k, s.normalize,
                                  out[0].ints.data(), out[1].values.data());
            out[1].scale = absolute(out[1].values);
            out[2].values.assign(static_cast<size_t>(s.tokens * s.hidden), 0.0);
            out[2].scale.assign(out[2].values.size(), 0.0);
            std::vector<double> y(static_cast<size_t>(s.hidden)), y_scale(y.size());
            for (int64_t token = 0; token < s.tokens; ++token) {
              for (int64_t j = 0; j < s.top_k; ++j) {
                const int64_t local = t[6].ints[out[0].ints[token * s.top_k + j]];
                reference_expert_row(&t[1].values[token * s.hidden], &t[4].values[local * 2 * s.inter * s.hidden],
                                     &t[5].values[local * s.hidden * s.inter], s.hidden, s.inter, y.data(),
                                     y_scale.data());
                const double weight = out[1].values[token * s.top_k + j];
                for (int64_t o = 0; o < s.hidden; ++o) {
                  out[2].values[token * s.hidden + o] += weight * y[o];
                  out[2].scale[token * s.hidden + o] += std::abs(weight) * (y_scale[o] + std::abs(y[o]));
                }
              }
            }
            return out;
          }});
    }
  }
}

const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> cases = [] {
    std::vector<OpCase> all;
    add_embed_cases(all);
    add_linear_cases(all);
    add_rms_norm_cases(all);
    add_add_rms_norm_cases(all);
    add_qk_norm_rope_cases(all);
    add_store_kv_cases(all);
    add_attention_cases(all);
    add_decode_attention_cases(all);
    add_elementwise_cases(all);
    add_scoring_cases(all);
    add_route_cases(all);
    add_group_by_expert_cases(all);
    add_expert_ffn_cases(all);
    add_combine_cases(all);
    add_routed_moe_cases(all);
    return all;
  }();
  return cases;
}

// ---- the harness ---------------------------------------------------------------------------------

// One row of the table on one backend with one activation and weight type.
struct OpPoint {
  size_t case_index;
  BackendKind backend;
  ScalarType activation, weight;
};

std::string name_of(const OpPoint& p) {
  return op_cases()[p.case_index].name + "_w" + scalar_name(p.weight) + "_a" + scalar_name(p.activation) +
         "_" + backend_name(p.backend);
}

// gtest prints a parameter with this (found by ADL) instead of as raw bytes.
void PrintTo(const OpPoint& p, std::ostream* os) { *os << name_of(p); }

std::vector<OpPoint> op_points() {
  std::vector<OpPoint> points;
  for (size_t i = 0; i < op_cases().size(); ++i) {
    const std::vector<ScalarType> weights = op_cases()[i].has_weights
                                                ? std::vector<ScalarType>{ScalarType::kF32, ScalarType::kBF16}
                                                : std::vector<ScalarType>{ScalarType::kF32};
    for (ScalarType weight : weights) {
      points.push_back({i, BackendKind::kCpu, ScalarType::kF32, weight});
      // CUDA rows exist everywhere, so a machine without a GPU shows them skipped.
      points.push_back({i, BackendKind::kCuda, ScalarType::kF32, weight});
      // The bf16 mode keeps bf16 weights only (the loader converts f32 checkpoints), and cuBLAS has
      // no bf16 x f32 GEMM: bf16 activations meet bf16 weights, or no weights at all.
      if (weight == ScalarType::kBF16 || !op_cases()[i].has_weights)
        points.push_back({i, BackendKind::kCuda, ScalarType::kBF16, weight});
    }
  }
  return points;
}

// Uploads the tensors, runs the op, and returns the outputs read back (in table order).
HostTensors run_case(Backend& backend, const OpCase& op, const HostTensors& inputs, ScalarType activation,
                     ScalarType weight) {
  std::vector<OwnedTensor> owned;
  Tensors views;
  std::vector<std::vector<uint8_t>> encoded;  // alive until synchronize(): copies may be asynchronous
  for (const HostTensor& host : inputs) {
    const ScalarType type = type_of(host.role, activation, weight);
    owned.push_back(make_tensor(backend, type, host.shape));
    views.push_back(owned.back().view());
    encoded.push_back(encode(host, type));
    backend.copy_from_host(views.back(), 0, encoded.back().data(), encoded.back().size());
  }
  backend.synchronize();
  op.run(backend, views);
  backend.synchronize();
  HostTensors outputs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].output) continue;
    std::vector<uint8_t> bytes(views[i].bytes());
    backend.copy_to_host(views[i], 0, bytes.data(), bytes.size());
    outputs.push_back(inputs[i]);
    decode(bytes, views[i].type, outputs.back());
  }
  return outputs;
}

// f32_tolerance: for the outputs of Role::kF32 (the op's tolerance unless stated otherwise).
void expect_outputs(const HostTensors& actual, const std::vector<Expected>& expected,
                    const std::vector<Expected>& scales, double tolerance, double f32_tolerance) {
  ASSERT_EQ(actual.size(), expected.size()) << "the reference must give one result per output";
  for (size_t i = 0; i < actual.size(); ++i) {
    SCOPED_TRACE("output " + actual[i].name);
    if (actual[i].role == Role::kI32) {
      EXPECT_EQ(actual[i].ints, expected[i].ints);
    } else {
      EXPECT_TRUE(all_close(actual[i].values, expected[i].values, scales[i].scale,
                            actual[i].role == Role::kF32 ? f32_tolerance : tolerance));
    }
  }
}

class BackendOp : public ::testing::TestWithParam<OpPoint> {};

TEST_P(BackendOp, MatchesReference) {
  const OpPoint point = GetParam();
  const OpCase& op = op_cases()[point.case_index];
  SCOPED_TRACE(seed_text());
  std::string missing;
  const std::unique_ptr<Backend> backend = make_backend(point.backend, missing);
  if (backend == nullptr) GTEST_SKIP() << name_of(point) << " skipped: " << missing;

  auto generator = case_generator(std::hash<std::string>{}(op.name));
  HostTensors inputs = op.make(generator);
  // A bf16 run computes from bf16 values: round them once here, for the reference and every backend.
  for (HostTensor& t : inputs) {
    if ((t.role == Role::kWeight && point.weight == ScalarType::kBF16) ||
        (t.role == Role::kActivation && point.activation == ScalarType::kBF16)) {
      round_to_bf16(t.values);
    }
  }
  const std::vector<Expected> expected = op.reference(inputs);
  const HostTensors actual = run_case(*backend, op, inputs, point.activation, point.weight);
  if (point.backend == BackendKind::kCpu) {
    expect_outputs(actual, expected, expected, op.tolerance.cpu, op.tolerance.cpu);
    return;
  }
  // Other backends against the CPU reference backend on the same (rounded) inputs.
  const auto cpu = make_cpu_backend();
  const HostTensors cpu_outputs = run_case(*cpu, op, inputs, ScalarType::kF32, point.weight);
  std::vector<Expected> cpu_expected(cpu_outputs.size());
  for (size_t i = 0; i < cpu_outputs.size(); ++i) {
    cpu_expected[i].values = to_double(cpu_outputs[i].values);
    cpu_expected[i].ints = cpu_outputs[i].ints;
  }
  const bool bf16 = point.activation == ScalarType::kBF16;
  const double tolerance = bf16 ? op.tolerance.cuda_bf16 : op.tolerance.cuda_f32;
  const double f32_tolerance =
      bf16 && op.tolerance.cuda_bf16_f32_outputs >= 0.0 ? op.tolerance.cuda_bf16_f32_outputs : tolerance;
  expect_outputs(actual, cpu_expected, expected, tolerance, f32_tolerance);
}

INSTANTIATE_TEST_SUITE_P(Table, BackendOp, ::testing::ValuesIn(op_points()),
                         [](const ::testing::TestParamInfo<OpPoint>& info) { return name_of(info.param); });

// ---- invalid arguments: every backend rejects them with kInvalidArgument naming the op ----------

// Tensors for one invalid call, in the backend's memory (real memory, so a call that checks too
// late does not crash but still fails the test by not throwing).
class Arena {
 public:
  explicit Arena(Backend& backend) : backend_(backend) {}
  Tensor operator()(ScalarType type, std::vector<int64_t> shape) {
    owned_.push_back(make_tensor(backend_, type, shape));
    return owned_.back().view();
  }
  // A view claiming the other memory space (data of this backend's memory, never touched).
  Tensor elsewhere(ScalarType type, std::vector<int64_t> shape) {
    Tensor t = (*this)(type, std::move(shape));
    t.space = backend_.memory_space() == MemorySpace::kHost ? MemorySpace::kDevice : MemorySpace::kHost;
    return t;
  }

 private:
  Backend& backend_;
  std::vector<OwnedTensor> owned_;
};

// routed_moe with E 8, top_k 2, H 16, I 8 and f32 tensors, `tokens` router rows (and routing
// scratch), x_tokens x rows, logits [tokens, logit_columns] and out [tokens, out_columns].
void call_routed_moe(Backend& b, Arena& a, int64_t tokens, int64_t x_tokens, int64_t logit_columns,
                     int64_t out_columns) {
  constexpr ScalarType F32 = ScalarType::kF32, I32 = ScalarType::kI32;
  const int64_t slots = tokens * 2;
  b.routed_moe(a(F32, {tokens, 16}), a(F32, {x_tokens, 16}),
               RoutedMoeWeights{a(F32, {8, 16}), a(ScalarType::kU8, {8}), a(F32, {8, 16, 16}), a(F32, {8, 16, 8}),
                                a(I32, {8}), true, Tensor{}, ScalarType::kBF16},
               RoutedMoeScratch{a(F32, {tokens, logit_columns}), a(I32, {tokens, 2}), a(F32, {tokens, 2}),
                                a(I32, {9}), a(I32, {slots}), a(I32, {slots}), a(F32, {slots, 16}),
                                a(F32, {slots, 8}), a(F32, {slots, 16})},
               a(F32, {tokens, out_columns}));
}

struct InvalidCall {
  const char* name;
  const char* op;             // must start the message
  const char* expected_text;  // must appear in the message
  std::function<void(Backend&, Arena&)> call;
};

constexpr ScalarType F32 = ScalarType::kF32, BF16 = ScalarType::kBF16, I32 = ScalarType::kI32,
                     U8 = ScalarType::kU8;
const AttentionShape kHeads{4, 2, 8};  // qkv_dim 64, q_dim 32, kv_dim 16

std::vector<InvalidCall> invalid_calls() {
  return {
      {"linear in_dim differs", "linear", "w is f32[64, 32]",
       [](Backend& b, Arena& a) {
         b.linear(a(F32, {4, 48}), a(F32, {64, 32}), a(F32, {4, 64}));
       }},
      {"linear w of ids", "linear", "it must be f32 or bf16",
       [](Backend& b, Arena& a) {
         b.linear(a(F32, {4, 32}), a(I32, {64, 32}), a(F32, {4, 64}));
       }},
      {"linear rank 3 x", "linear", "it must have rank 2",
       [](Backend& b, Arena& a) {
         b.linear(a(F32, {4, 2, 16}), a(F32, {64, 32}), a(F32, {4, 64}));
       }},
      {"linear y rows differ", "linear", "the row count differs",
       [](Backend& b, Arena& a) {
         b.linear(a(F32, {4, 32}), a(F32, {64, 32}), a(F32, {5, 64}));
       }},
      {"linear x in the other memory", "linear", "but this backend's memory is on",
       [](Backend& b, Arena& a) {
         b.linear(a.elsewhere(F32, {4, 32}), a(F32, {64, 32}), a(F32, {4, 64}));
       }},
      {"embed hidden differs", "embed", "hidden differs",
       [](Backend& b, Arena& a) {
         b.embed(a(I32, {3}), a(F32, {10, 16}), a(F32, {3, 8}));
       }},
      {"embed f32 ids", "embed", "ids is f32[3]",
       [](Backend& b, Arena& a) {
         b.embed(a(F32, {3}), a(F32, {10, 16}), a(F32, {3, 16}));
       }},
      {"rms_norm weight dim", "rms_norm", "dim differs",
       [](Backend& b, Arena& a) {
         b.rms_norm(a(F32, {3, 16}), a(F32, {8}), a(F32, {3, 16}), kEps);
       }},
      {"rms_norm y shape", "rms_norm", "the shapes differ",
       [](Backend& b, Arena& a) {
         b.rms_norm(a(F32, {3, 16}), a(F32, {16}), a(F32, {4, 16}), kEps);
       }},
      {"add_rms_norm bf16 residual", "add_rms_norm", "residual is bf16[3, 16]",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 16}), a(BF16, {3, 16}), a(F32, {16}), a(F32, {3, 16}), Tensor{}, kEps);
       }},
      {"add_rms_norm delta shape", "add_rms_norm", "the shapes differ",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 8}), a(F32, {3, 16}), a(F32, {16}), a(F32, {3, 16}), Tensor{}, kEps);
       }},
      {"add_rms_norm weight dim", "add_rms_norm", "dim differs",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 16}), a(F32, {3, 16}), a(F32, {8}), a(F32, {3, 16}), Tensor{}, kEps);
       }},
      {"add_rms_norm normed rows", "add_rms_norm", "normed is f32[4, 16]",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 16}), a(F32, {3, 16}), a(F32, {16}), a(F32, {4, 16}), Tensor{}, kEps);
       }},
      {"add_rms_norm bf16 normed_f32", "add_rms_norm", "normed_f32 is bf16[3, 16]",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 16}), a(F32, {3, 16}), a(F32, {16}), a(F32, {3, 16}), a(BF16, {3, 16}),
                        kEps);
       }},
      {"add_rms_norm normed_f32 shape", "add_rms_norm", "normed_f32 is f32[3, 8]",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 16}), a(F32, {3, 16}), a(F32, {16}), a(F32, {3, 16}), a(F32, {3, 8}),
                        kEps);
       }},
      // Only a default Tensor{} means "left out": a rank-0 tensor with memory is a wrong argument.
      {"add_rms_norm rank 0 normed_f32", "add_rms_norm", "it must have rank 2",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 16}), a(F32, {3, 16}), a(F32, {16}), a(F32, {3, 16}), a(F32, {}), kEps);
       }},
      {"add_rms_norm normed is the residual", "add_rms_norm", "their memory overlaps",
       [](Backend& b, Arena& a) {
         const Tensor residual = a(F32, {3, 16});
         b.add_rms_norm(a(F32, {3, 16}), residual, a(F32, {16}), residual, Tensor{}, kEps);
       }},
      {"add_rms_norm normed_f32 overlaps normed", "add_rms_norm", "their memory overlaps",
       [](Backend& b, Arena& a) {
         const Tensor both = a(F32, {4, 16});
         b.add_rms_norm(a(F32, {3, 16}), a(F32, {3, 16}), a(F32, {16}), both.rows_view(0, 3),
                        both.rows_view(1, 3), kEps);
       }},
      {"add_rms_norm residual in the other memory", "add_rms_norm", "but this backend's memory is on",
       [](Backend& b, Arena& a) {
         b.add_rms_norm(a(F32, {3, 16}), a.elsewhere(F32, {3, 16}), a(F32, {16}), a(F32, {3, 16}), Tensor{},
                        kEps);
       }},
      {"qk_norm_rope odd head_dim", "qk_norm_rope", "head_dim = 7 is odd",
       [](Backend& b, Arena& a) {
         b.qk_norm_rope(a(F32, {2, 56}), a(F32, {7}), a(F32, {7}), a(I32, {2}), AttentionShape{4, 2, 7}, kEps,
                        1e4);
       }},
      {"qk_norm_rope theta 0", "qk_norm_rope", "theta = 0",
       [](Backend& b, Arena& a) {
         b.qk_norm_rope(a(F32, {2, 64}), a(F32, {8}), a(F32, {8}), a(I32, {2}), kHeads, kEps, 0.0);
       }},
      {"qk_norm_rope heads not a multiple", "qk_norm_rope",
       "num_heads = 6 is not a multiple of num_kv_heads = 4",
       [](Backend& b, Arena& a) {
         b.qk_norm_rope(a(F32, {2, 112}), a(F32, {8}), a(F32, {8}), a(I32, {2}), AttentionShape{6, 4, 8},
                        kEps, 1e4);
       }},
      {"qk_norm_rope qkv width", "qk_norm_rope", "qkv is f32[2, 60]",
       [](Backend& b, Arena& a) {
         b.qk_norm_rope(a(F32, {2, 60}), a(F32, {8}), a(F32, {8}), a(I32, {2}), kHeads, kEps, 1e4);
       }},
      {"qk_norm_rope positions per row", "qk_norm_rope", "one entry per row",
       [](Backend& b, Arena& a) {
         b.qk_norm_rope(a(F32, {2, 64}), a(F32, {8}), a(F32, {8}), a(I32, {3}), kHeads, kEps, 1e4);
       }},
      {"store_kv block size", "store_kv", "kKvBlockSize",
       [](Backend& b, Arena& a) {
         b.store_kv(a(F32, {2, 64}), a(I32, {2}), a(F32, {4, 8, 2, 8}), a(F32, {4, 8, 2, 8}), kHeads);
       }},
      // decode_attention names the failing step of its three ops.
      {"decode_attention block size", "decode_attention", "the store_kv step: store_kv:",
       [](Backend& b, Arena& a) {
         b.decode_attention(a(F32, {2, 64}), a(F32, {8}), a(F32, {8}), a(F32, {4, 8, 2, 8}), a(F32, {4, 8, 2, 8}),
                            AttentionTables{a(I32, {2}), a(I32, {2}), a(I32, {2}), a(I32, {2, 4})}, kHeads, kEps, 1e4,
                            a(F32, {2, 32}));
       }},
      {"decode_attention positions per row", "decode_attention", "the qk_norm_rope step: qk_norm_rope:",
       [](Backend& b, Arena& a) {
         b.decode_attention(a(F32, {2, 64}), a(F32, {8}), a(F32, {8}), a(F32, {4, 16, 2, 8}), a(F32, {4, 16, 2, 8}),
                            AttentionTables{a(I32, {3}), a(I32, {2}), a(I32, {2}), a(I32, {2, 4})}, kHeads, kEps, 1e4,
                            a(F32, {2, 32}));
       }},
      {"decode_attention out width", "decode_attention", "the attention step: attention:",
       [](Backend& b, Arena& a) {
         b.decode_attention(a(F32, {2, 64}), a(F32, {8}), a(F32, {8}), a(F32, {4, 16, 2, 8}), a(F32, {4, 16, 2, 8}),
                            AttentionTables{a(I32, {2}), a(I32, {2}), a(I32, {2}), a(I32, {2, 4})}, kHeads, kEps, 1e4,
                            a(F32, {2, 64}));
       }},
      {"store_kv pool type", "store_kv", "the KV cache holds the activation type",
       [](Backend& b, Arena& a) {
         b.store_kv(a(F32, {2, 64}), a(I32, {2}), a(BF16, {4, 16, 2, 8}), a(BF16, {4, 16, 2, 8}), kHeads);
       }},
      {"attention zero kv heads", "attention", "every count must be >= 1",
       [](Backend& b, Arena& a) {
         b.attention(a(F32, {2, 32}), a(F32, {4, 16, 0, 8}), a(F32, {4, 16, 0, 8}), a(I32, {1, 4}),
                     a(I32, {2}), a(I32, {2}), AttentionShape{4, 0, 8}, a(F32, {2, 32}));
       }},
      {"attention f32 block tables", "attention", "block_tables is f32[1, 4]",
       [](Backend& b, Arena& a) {
         b.attention(a(F32, {2, 64}), a(F32, {4, 16, 2, 8}), a(F32, {4, 16, 2, 8}), a(F32, {1, 4}),
                     a(I32, {2}), a(I32, {2}), kHeads, a(F32, {2, 32}));
       }},
      {"attention out width", "attention", "out is f32[2, 64]",
       [](Backend& b, Arena& a) {
         b.attention(a(F32, {2, 64}), a(F32, {4, 16, 2, 8}), a(F32, {4, 16, 2, 8}), a(I32, {1, 4}),
                     a(I32, {2}), a(I32, {2}), kHeads, a(F32, {2, 64}));
       }},
      {"silu_mul widths", "silu_mul", "gate_up must hold 2 * out's columns",
       [](Backend& b, Arena& a) {
         b.silu_mul(a(F32, {3, 16}), a(F32, {3, 16}));
       }},
      {"add shapes", "add", "the shapes differ",
       [](Backend& b, Arena& a) {
         b.add(a(F32, {3, 16}), a(F32, {16, 3}));
       }},
      {"gather_rows types", "gather_rows", "the types differ",
       [](Backend& b, Arena& a) {
         b.gather_rows(a(F32, {5, 4}), a(I32, {2}), a(I32, {2, 4}));
       }},
      {"argmax rows", "argmax", "the row count differs",
       [](Backend& b, Arena& a) {
         b.argmax(a(F32, {3, 10}), a(I32, {4}));
       }},
      {"log_softmax out of ids", "log_softmax", "out is i32[3, 10]",
       [](Backend& b, Arena& a) {
         b.log_softmax(a(F32, {3, 10}), a(I32, {3, 10}));
       }},
      {"log_softmax in place", "log_softmax", "their memory overlaps",
       [](Backend& b, Arena& a) {
         const Tensor logits = a(F32, {3, 10});
         b.log_softmax(logits, logits);
       }},
      {"score_rows reference shape", "score_rows", "the shapes differ",
       [](Backend& b, Arena& a) {
         b.score_rows(a(F32, {3, 10}), a(I32, {3}), a(F32, {3, 11}), a(F32, {3, kNumRowScores}), a(I32, {3}));
       }},
      {"score_rows scores columns", "score_rows", "one column per RowScoreColumn",
       [](Backend& b, Arena& a) {
         b.score_rows(a(F32, {3, 10}), a(I32, {3}), a(F32, {3, 10}), a(F32, {3, 2}), a(I32, {3}));
       }},
      {"score_rows targets rows", "score_rows", "one entry per row is needed",
       [](Backend& b, Arena& a) {
         b.score_rows(a(F32, {3, 10}), a(I32, {4}), a(F32, {3, 10}), a(F32, {3, kNumRowScores}), a(I32, {3}));
       }},
      {"score_rows bf16 logits", "score_rows", "logits is bf16[3, 10]",
       [](Backend& b, Arena& a) {
         b.score_rows(a(BF16, {3, 10}), a(I32, {3}), a(F32, {3, 10}), a(F32, {3, kNumRowScores}),
                      a(I32, {3}));
       }},
      {"score_rows scores over logits", "score_rows", "their memory overlaps",
       [](Backend& b, Arena& a) {
         const Tensor logits = a(F32, {3, 10});
         b.score_rows(logits, a(I32, {3}), a(F32, {3, 10}),
                      logits.reshaped({10, kNumRowScores}).rows_view(0, 3), a(I32, {3}));
       }},
      {"route_top_k k above experts", "route_top_k", "top_k = 9 exceeds the 8 experts",
       [](Backend& b, Arena& a) {
         b.route_top_k(a(F32, {2, 8}), a(U8, {8}), a(I32, {2, 9}), a(F32, {2, 9}), true);
       }},
      {"route_top_k bf16 weights", "route_top_k", "weights is bf16[2, 2]",
       [](Backend& b, Arena& a) {
         b.route_top_k(a(F32, {2, 8}), a(U8, {8}), a(I32, {2, 2}), a(BF16, {2, 2}), true);
       }},
      {"group_by_expert offsets", "group_by_expert", "num_experts + 1",
       [](Backend& b, Arena& a) {
         b.group_by_expert(a(I32, {3, 2}), 8, 2, a(I32, {8}), a(I32, {6}), a(I32, {6}));
       }},
      {"group_by_expert top_k 0", "group_by_expert", "top_k = 0 must be >= 1",
       [](Backend& b, Arena& a) {
         b.group_by_expert(a(I32, {6}), 8, 0, a(I32, {9}), a(I32, {6}), a(I32, {6}));
       }},
      {"expert_ffn intermediate", "expert_ffn", "the intermediate size differs",
       [](Backend& b, Arena& a) {
         b.expert_ffn(a(F32, {3, 16}), a(I32, {5}), a(F32, {2, 16, 16}), a(F32, {2, 16, 6}), a(I32, {4}),
                      a(F32, {3, 8}), a(F32, {3, 16}));
       }},
      {"expert_ffn mixed weight types", "expert_ffn", "one weight type per layer",
       [](Backend& b, Arena& a) {
         b.expert_ffn(a(F32, {3, 16}), a(I32, {5}), a(F32, {2, 16, 16}), a(BF16, {2, 16, 8}), a(I32, {4}),
                      a(F32, {3, 8}), a(F32, {3, 16}));
       }},
      {"combine_top_k expert_out rows", "combine_top_k", "one row per (token, slot)",
       [](Backend& b, Arena& a) {
         b.combine_top_k(a(F32, {5, 16}), a(I32, {6}), a(F32, {3, 2}), a(F32, {3, 16}));
       }},
      {"routed_moe logits", "routed_moe", "the router step: linear:",
       [](Backend& b, Arena& a) { call_routed_moe(b, a, 1, 1, 7, 16); }},
      {"routed_moe out", "routed_moe", "the combine step: combine_top_k:",
       [](Backend& b, Arena& a) { call_routed_moe(b, a, 1, 1, 8, 12); }},
      {"routed_moe token counts", "routed_moe", "the token counts differ",
       [](Backend& b, Arena& a) { call_routed_moe(b, a, 2, 1, 8, 16); }},
      {"copy_from_host past the end", "copy_from_host", "are outside f32[4]",
       [](Backend& b, Arena& a) {
         const float host[8] = {};
         b.copy_from_host(a(F32, {4}), 8, host, 16);
       }},
      {"copy byte counts", "copy", "the byte counts differ",
       [](Backend& b, Arena& a) { b.copy(a(F32, {4}), a(F32, {5})); }},
  };
}

class BackendErrors : public ::testing::TestWithParam<BackendKind> {};

TEST_P(BackendErrors, InvalidArgumentsThrowNamingTheOp) {
  std::string missing;
  const std::unique_ptr<Backend> backend = make_backend(GetParam(), missing);
  if (backend == nullptr)
    GTEST_SKIP() << "invalid-argument table on " << backend_name(GetParam()) << " skipped: " << missing;
  for (const InvalidCall& invalid : invalid_calls()) {
    SCOPED_TRACE(invalid.name);
    Arena arena(*backend);
    try {
      invalid.call(*backend, arena);
      ADD_FAILURE() << "no exception";
    } catch (const Error& error) {
      const std::string message = error.what();
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument) << message;
      EXPECT_EQ(message.rfind(std::string(invalid.op) + ": ", 0), 0u)
          << "message must start with the op: " << message;
      EXPECT_NE(message.find(invalid.expected_text), std::string::npos)
          << "message: " << message << "\nexpected to contain: " << invalid.expected_text;
    }
  }
  backend->synchronize();  // nothing was enqueued, and the backend is still usable
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendErrors, ::testing::Values(BackendKind::kCpu, BackendKind::kCuda),
                         [](const ::testing::TestParamInfo<BackendKind>& info) {
                           return backend_name(info.param);
                         });

// ---- the CPU backend's own checks ------------------------------------------------------------------

// The CPU reads ids, slots and offsets before indexing with them; a wrong one is an argument error
// naming the entry, not a stray read.
TEST(CpuBackendValues, OutOfRangeValuesAreRejected) {
  const auto backend = make_cpu_backend();
  Arena a(*backend);
  const auto i32 = [&](std::vector<int32_t> values) {
    Tensor t = a(I32, {static_cast<int64_t>(values.size())});
    std::memcpy(t.data, values.data(), values.size() * 4);
    return t;
  };
  const auto u8 = [&](std::vector<uint8_t> values) {
    Tensor t = a(U8, {static_cast<int64_t>(values.size())});
    std::memcpy(t.data, values.data(), values.size());
    return t;
  };
  const auto expect_invalid = [](const std::function<void()>& call, const std::string& text) {
    SCOPED_TRACE(text);
    try {
      call();
      ADD_FAILURE() << "no exception";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument) << error.what();
      EXPECT_NE(std::string(error.what()).find(text), std::string::npos) << error.what();
    }
  };
  expect_invalid(
      [&] {
        backend->embed(i32({1, 10}), a(F32, {10, 4}), a(F32, {2, 4}));
      },
      "embed: ids[1] = 10 is outside the table's vocabulary [0, 10)");
  expect_invalid(
      [&] {
        backend->route_top_k(a(F32, {2, 8}), u8({1, 1, 1, 0, 0, 0, 0, 0}), a(I32, {2, 4}), a(F32, {2, 4}),
                             true);
      },
      "route_top_k: top_k = 4 exceeds the 3 present experts (of 8)");
  expect_invalid(
      [&] {
        backend->store_kv(a(F32, {1, 64}), i32({64}), a(F32, {4, 16, 2, 8}), a(F32, {4, 16, 2, 8}), kHeads);
      },
      "store_kv: slot_mapping[0] = 64 is past the pool's 64 slots");
  expect_invalid(
      [&] {
        backend->attention(a(F32, {1, 64}), a(F32, {4, 16, 2, 8}), a(F32, {4, 16, 2, 8}),
                           i32({0, 4}).reshaped({1, 2}), i32({0}), i32({20}), kHeads, a(F32, {1, 32}));
      },
      "block_tables[0, 1] = 4 is outside the pool's 4 blocks");
  expect_invalid(
      [&] {
        backend->attention(a(F32, {1, 64}), a(F32, {4, 16, 2, 8}), a(F32, {4, 16, 2, 8}),
                           i32({0, 1}).reshaped({1, 2}), i32({0}), i32({32}), kHeads, a(F32, {1, 32}));
      },
      "position 32 needs 3 blocks but a block table holds 2");
  expect_invalid(
      [&] {
        backend->gather_rows(a(F32, {3, 2}), i32({3}), a(F32, {1, 2}));
      },
      "index[0] = 3 is outside");
  expect_invalid(
      [&] {
        backend->group_by_expert(i32({0, 8}), 8, 1, a(I32, {9}), a(I32, {2}), a(I32, {2}));
      },
      "expert_ids[1] = 8 is outside [0, num_experts = 8)");
  expect_invalid(
      [&] {
        backend->expert_ffn(a(F32, {2, 4}), i32({0, 1, 2}), a(F32, {1, 4, 4}), a(F32, {1, 4, 2}),
                            i32({0, -1}), a(F32, {2, 2}), a(F32, {2, 4}));
      },
      "expert 1 is not hosted here (local_index -1) but has 1 rows");
  expect_invalid(
      [&] {
        backend->combine_top_k(a(F32, {2, 4}), i32({0, 2}), a(F32, {1, 2}), a(F32, {1, 4}));
      },
      "sorted_position[1] = 2 is outside expert_out's rows [0, 2)");
  expect_invalid(
      [&] {
        backend->score_rows(a(F32, {2, 5}), i32({0, 5}), a(F32, {2, 5}), a(F32, {2, kNumRowScores}),
                            a(I32, {2}));
      },
      "score_rows: targets[1] = 5 is outside the vocabulary [0, 5)");
}

// The CPU's fused op is the unfused pair, bit for bit: `epic run` output does not depend on which
// the model runner calls.
TEST(CpuBackendFused, AddRmsNormIsBitwiseAddThenRmsNorm) {
  SCOPED_TRACE(seed_text());
  const auto backend = make_cpu_backend();
  auto generator = case_generator(current_case_index());
  struct Shape {
    int64_t rows, dim;
  };
  for (const Shape s : {Shape{1, 1}, Shape{3, 17}, Shape{2, 1001}, Shape{7, 2048}}) {
    SCOPED_TRACE("rows " + std::to_string(s.rows) + " dim " + std::to_string(s.dim));
    const int64_t n = s.rows * s.dim;
    const std::vector<float> delta = random_values(generator, n);
    const std::vector<float> residual = random_values(generator, n, 3.0f);
    const std::vector<float> weight = random_values(generator, s.dim);
    Arena a(*backend);
    const auto filled = [&](const std::vector<float>& values, std::vector<int64_t> shape) {
      Tensor t = a(F32, std::move(shape));
      std::memcpy(t.data, values.data(), values.size() * sizeof(float));
      return t;
    };
    const Tensor delta_t = filled(delta, {s.rows, s.dim}), weight_t = filled(weight, {s.dim});
    // The unfused pair, as the model runner called it before: add, then rms_norm twice.
    const Tensor pair_residual = filled(residual, {s.rows, s.dim});
    const Tensor pair_normed = filled(nan_filled(n), {s.rows, s.dim});
    const Tensor pair_normed_again = filled(nan_filled(n), {s.rows, s.dim});
    backend->add(delta_t, pair_residual);
    backend->rms_norm(pair_residual, weight_t, pair_normed, kEps);
    backend->rms_norm(pair_residual, weight_t, pair_normed_again, kEps);
    for (const bool with_f32 : {false, true}) {
      SCOPED_TRACE(with_f32 ? "with normed_f32" : "without normed_f32");
      const Tensor fused_residual = filled(residual, {s.rows, s.dim});
      const Tensor fused_normed = filled(nan_filled(n), {s.rows, s.dim});
      const Tensor fused_normed_f32 = filled(nan_filled(n), {s.rows, s.dim});
      backend->add_rms_norm(delta_t, fused_residual, weight_t, fused_normed,
                            with_f32 ? fused_normed_f32 : Tensor{}, kEps);
      const size_t bytes = static_cast<size_t>(n) * sizeof(float);
      EXPECT_EQ(std::memcmp(fused_residual.data, pair_residual.data, bytes), 0) << "residual";
      EXPECT_EQ(std::memcmp(fused_normed.data, pair_normed.data, bytes), 0) << "normed";
      if (with_f32) {
        EXPECT_EQ(std::memcmp(fused_normed_f32.data, pair_normed_again.data, bytes), 0) << "normed_f32";
      } else {  // left out: never written
        const float* untouched = fused_normed_f32.as<const float>();
        EXPECT_TRUE(std::all_of(untouched, untouched + n, [](float v) { return std::isnan(v); }));
      }
    }
  }
}

TEST(CpuBackendTypes, Bf16ActivationsAreUnsupportedNamingTheOp) {
  const auto backend = make_cpu_backend();
  Arena a(*backend);
  try {
    backend->linear(a(BF16, {2, 8}), a(BF16, {4, 8}), a(BF16, {2, 4}));
    FAIL() << "no exception";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kUnsupported) << error.what();
    EXPECT_NE(std::string(error.what()).find("linear: x is bf16[2, 8]"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("fp32 reference"), std::string::npos) << error.what();
  }
}

TEST(CpuBackendMemory, HostMemoryCopiesAndNoGraphs) {
  const auto backend = make_cpu_backend();
  EXPECT_EQ(backend->memory_space(), MemorySpace::kHost);
  OwnedTensor t = backend->new_tensor(F32, {3, 5});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.view().data) % 64, 0u) << "64-byte aligned";
  EXPECT_GE(t.bytes(), 60u);
  auto generator = case_generator(current_case_index());
  const std::vector<float> values = random_values(generator, 15);
  backend->copy_from_host(t, 0, values.data(), 60);
  OwnedTensor u = backend->new_tensor(F32, {15});
  backend->copy(t, u);
  std::vector<float> back = nan_filled(15);
  backend->copy_to_host(u, 4, back.data() + 1, 56);  // offsets in bytes
  backend->synchronize();
  EXPECT_TRUE(std::isnan(back[0]));
  EXPECT_EQ(0, std::memcmp(back.data() + 1, values.data() + 1, 56));
  EXPECT_EQ(backend->allocate_staging(100)->space(), MemorySpace::kHost);
  EXPECT_EQ(backend->capture([] {}), nullptr) << "the CPU backend runs ops at once; it has no graphs";
}

// ---- the CPU's results do not depend on its thread count ----------------------------------------

// Thread counts split linear's out dimension (and attention's (row, head) items) differently; each
// element must still be summed in the same order.
TEST(CpuThreads, LinearSameBitsForAnyThreadCount) {
  SCOPED_TRACE(seed_text());
  constexpr int64_t kRows = 37, kInDim = 2048, kOutDim = 4099;
  auto generator = case_generator(current_case_index());
  HostTensors inputs = {act_in("x", {kRows, kInDim}, random_values(generator, kRows * kInDim)),
                        weight_in("w", {kOutDim, kInDim}, random_values(generator, kOutDim * kInDim)),
                        act_out("y", {kRows, kOutDim})};
  OpCase linear{"linear", true, {}, nullptr, [](Backend& b, const Tensors& t) { b.linear(t[0], t[1], t[2]); },
                nullptr};
  for (ScalarType weight : {F32, BF16}) {
    SCOPED_TRACE(std::string("weights ") + scalar_name(weight));
    const auto one_thread = make_cpu_backend(1);
    const HostTensors single = run_case(*one_thread, linear, inputs, F32, weight);
    for (int num_threads : {2, 3, 5, 16}) {
      const auto backend = make_cpu_backend(num_threads);
      const HostTensors y = run_case(*backend, linear, inputs, F32, weight);
      EXPECT_EQ(0, std::memcmp(y[0].values.data(), single[0].values.data(), single[0].values.size() * 4))
          << "linear with " << num_threads << " threads differs from 1 thread";
    }
  }
}

TEST(CpuThreads, AttentionSameBitsForAnyThreadCount) {
  SCOPED_TRACE(seed_text());
  std::vector<OpCase> cases;
  add_attention_cases(cases);
  const OpCase* long_prompt = nullptr;
  for (const OpCase& c : cases) {
    if (c.name.find("long_prompt") != std::string::npos) long_prompt = &c;
  }
  ASSERT_NE(long_prompt, nullptr);
  auto generator = case_generator(current_case_index());
  const HostTensors inputs = long_prompt->make(generator);
  const auto one_thread = make_cpu_backend(1);
  const HostTensors single = run_case(*one_thread, *long_prompt, inputs, F32, F32);
  for (int num_threads : {2, 3, 5, 16}) {
    const auto backend = make_cpu_backend(num_threads);
    const HostTensors out = run_case(*backend, *long_prompt, inputs, F32, F32);
    EXPECT_EQ(0, std::memcmp(out[0].values.data(), single[0].values.data(), single[0].values.size() * 4))
        << "attention with " << num_threads << " threads differs from 1 thread";
  }
}

}  // namespace
}  // namespace epic
