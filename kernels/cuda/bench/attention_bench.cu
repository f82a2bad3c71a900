// Micro-benchmark of the bf16 tensor-core attention paths (cuda_kernels::attention) at Qwen3-30B-A3B
// shapes (32 q heads, 4 kv heads, head_dim 128) and a few others: prompts (one of 300 and of 4096
// tokens, a batch of 17/64/100, a chunk after a cached prefix, shuffled rows), decode (64 x 2048 keys,
// 1 x 32768, a ragged batch with padding rows). Every output element is checked against an fp32 host
// reference on random data (fresh seed, printed: --seed replays it); the KV blocks are scattered
// over the pool, and every pool slot no row may read, the k/v columns of qkv and the output's guard
// rows hold NaN. Timed cases print ms and TFLOP/s (causal FLOPs) or GB/s (K and V bytes read).
// Exit status 1 on any failed check.
// Usage: epic_attention_bench [--seed N] [--checks-only]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/bench/bench_support.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"

namespace epic::cuda_kernels {
namespace {

constexpr int kWarmupCalls = 3;
constexpr int kTimedCalls = 20;
constexpr int64_t kGuardRows = 3;
constexpr uint16_t kNanBits = 0x7fc0;
// |got - want| <= tolerance x sum_j p_j |v_j| per element (the op table's bf16 bound): q, k and v
// are bf16 for both sides; the GPU rounds probabilities to bf16 for P V and rounds the output once.
constexpr double kTolerance = 1e-2;

int g_failures = 0;

using bench::DeviceBuffer;
using bench::from_bf16_bits;
using bench::to_bf16_bits;

// A fast deterministic stream of uniform floats in [-1, 1) (splitmix64): the pools of the long
// cases hold hundreds of millions of values.
class Uniform {
 public:
  explicit Uniform(uint64_t seed) : state_(seed) {}
  float next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>(static_cast<double>(z >> 40) / static_cast<double>(1ull << 23) - 1.0);
  }

 private:
  uint64_t state_;
};

struct Sequence {
  int64_t queries;  // rows of this sequence in the call
  int64_t first;    // position of its first row; positions 0 .. first + queries - 1 are stored
};

enum class Metric { kNone, kFlops, kBandwidth };

struct Case {
  std::string name;
  std::vector<Sequence> sequences;
  int64_t heads = 32, kv_heads = 4, head_dim = 128;
  bool shuffle_rows = false;  // rows in random order (tiles then mix sequences)
  int64_t padding_rows = 0;   // extra rows at position -1: zeros expected
  Metric metric = Metric::kNone;
};

// Host and device copies of one case's inputs; host values are the bf16 values the device sees.
struct CaseData {
  int64_t rows = 0, num_blocks = 0, max_blocks = 0, qkv_dim = 0, q_dim = 0, kv_dim = 0;
  std::vector<uint16_t> qkv_bits, key_bits, value_bits;
  std::vector<int32_t> tables, row_sequence, positions;
};

CaseData make_data(const Case& c, uint64_t seed) {
  CaseData data;
  std::mt19937_64 rng(seed);
  data.q_dim = c.heads * c.head_dim;
  data.kv_dim = c.kv_heads * c.head_dim;
  data.qkv_dim = data.q_dim + 2 * data.kv_dim;
  int64_t blocks_needed = 0;
  for (const Sequence& s : c.sequences) {
    const int64_t blocks = (s.first + s.queries + kKvBlockSize - 1) / kKvBlockSize;
    blocks_needed += blocks;
    data.max_blocks = std::max(data.max_blocks, blocks);
  }
  data.num_blocks = blocks_needed + 5;  // spare blocks nobody may read
  std::vector<int32_t> free_blocks(static_cast<size_t>(data.num_blocks));
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), rng);

  const int64_t slots = data.num_blocks * kKvBlockSize;
  data.key_bits.assign(static_cast<size_t>(slots * data.kv_dim), kNanBits);
  data.value_bits.assign(data.key_bits.size(), kNanBits);
  data.tables.assign(static_cast<size_t>(c.sequences.size() * data.max_blocks), -1);
  Uniform uniform(seed ^ 0x5eed5eed5eedull);
  size_t next_block = 0;
  for (size_t q = 0; q < c.sequences.size(); ++q) {
    const Sequence& s = c.sequences[q];
    for (int64_t b = 0; b * kKvBlockSize < s.first + s.queries; ++b)
      data.tables[q * data.max_blocks + b] = free_blocks[next_block++];
    for (int64_t p = 0; p < s.first + s.queries; ++p) {  // stored positions; the rest stay NaN
      const int64_t slot =
          int64_t{data.tables[q * data.max_blocks + p / kKvBlockSize]} * kKvBlockSize + p % kKvBlockSize;
      for (int64_t i = 0; i < data.kv_dim; ++i) {
        data.key_bits[slot * data.kv_dim + i] = to_bf16_bits(uniform.next());
        data.value_bits[slot * data.kv_dim + i] = to_bf16_bits(uniform.next());
      }
    }
    for (int64_t i = 0; i < s.queries; ++i) {
      data.row_sequence.push_back(static_cast<int32_t>(q));
      data.positions.push_back(static_cast<int32_t>(s.first + i));
    }
  }
  for (int64_t i = 0; i < c.padding_rows; ++i) {
    data.row_sequence.push_back(0);
    data.positions.push_back(-1);
  }
  data.rows = static_cast<int64_t>(data.positions.size());
  if (c.shuffle_rows) {
    std::vector<size_t> order(static_cast<size_t>(data.rows));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<int32_t> sequence(order.size()), position(order.size());
    for (size_t i = 0; i < order.size(); ++i)
      sequence[i] = data.row_sequence[order[i]], position[i] = data.positions[order[i]];
    data.row_sequence.swap(sequence);
    data.positions.swap(position);
  }
  // q columns random (scaled so scores spread over several units); k and v columns NaN: attention
  // reads q from qkv and keys and values only from the pools.
  data.qkv_bits.assign(static_cast<size_t>(data.rows * data.qkv_dim), kNanBits);
  const float q_scale = 2.0f;
  for (int64_t r = 0; r < data.rows; ++r)
    for (int64_t i = 0; i < data.q_dim; ++i)
      data.qkv_bits[r * data.qkv_dim + i] = to_bf16_bits(q_scale * uniform.next());
  return data;
}

// out [rows, q_dim] and the per-element bound scale sum_j p_j |v_j| (0 for padding rows), fp32 on
// the host with double sums, threads over rows.
void reference(const Case& c, const CaseData& data, std::vector<float>& out, std::vector<float>& scale) {
  out.assign(static_cast<size_t>(data.rows * data.q_dim), 0.0f);
  scale.assign(out.size(), 0.0f);
  std::vector<float> keys(data.key_bits.size()), values(data.value_bits.size()), qkv(data.qkv_bits.size());
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = from_bf16_bits(data.key_bits[i]);
  for (size_t i = 0; i < values.size(); ++i) values[i] = from_bf16_bits(data.value_bits[i]);
  for (size_t i = 0; i < qkv.size(); ++i) qkv[i] = from_bf16_bits(data.qkv_bits[i]);
  const int64_t group = c.heads / c.kv_heads;
  const int64_t dim = c.head_dim;
  const float softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
  const auto work = [&](int64_t first_row, int64_t end_row) {
    std::vector<float> probability;
    std::vector<double> accumulated(static_cast<size_t>(dim)), magnitude(static_cast<size_t>(dim));
    std::vector<int64_t> slot_of;
    for (int64_t r = first_row; r < end_row; ++r) {
      const int32_t position = data.positions[r];
      if (position < 0) continue;
      const int32_t* table = &data.tables[data.row_sequence[r] * data.max_blocks];
      slot_of.resize(static_cast<size_t>(position) + 1);
      for (int64_t p = 0; p <= position; ++p)
        slot_of[p] = int64_t{table[p / kKvBlockSize]} * kKvBlockSize + p % kKvBlockSize;
      probability.resize(slot_of.size());
      for (int64_t h = 0; h < c.heads; ++h) {
        const float* q = &qkv[r * data.qkv_dim + h * dim];
        const int64_t kv_offset = (h / group) * dim;
        float max_score = -INFINITY;
        for (int64_t p = 0; p <= position; ++p) {
          const float* k = &keys[slot_of[p] * data.kv_dim + kv_offset];
          float partial[8] = {};
          for (int64_t d = 0; d < dim; d += 8)
            for (int j = 0; j < 8; ++j) partial[j] += q[d + j] * k[d + j];
          float dot = 0.0f;
          for (float value : partial) dot += value;
          probability[p] = dot * softmax_scale;
          max_score = std::max(max_score, probability[p]);
        }
        double denominator = 0.0;
        for (int64_t p = 0; p <= position; ++p) {
          probability[p] = std::exp(probability[p] - max_score);
          denominator += probability[p];
        }
        std::fill(accumulated.begin(), accumulated.end(), 0.0);
        std::fill(magnitude.begin(), magnitude.end(), 0.0);
        for (int64_t p = 0; p <= position; ++p) {
          const float* v = &values[slot_of[p] * data.kv_dim + kv_offset];
          const double weight = probability[p];
          for (int64_t d = 0; d < dim; ++d) {
            accumulated[d] += weight * v[d];
            magnitude[d] += weight * std::fabs(v[d]);
          }
        }
        for (int64_t d = 0; d < dim; ++d) {
          out[r * data.q_dim + h * dim + d] = static_cast<float>(accumulated[d] / denominator);
          scale[r * data.q_dim + h * dim + d] = static_cast<float>(magnitude[d] / denominator);
        }
      }
    }
  };
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), data.rows));
  std::vector<std::thread> pool;
  // Rows interleaved in small chunks: causal rows grow in cost, contiguous halves would not balance.
  constexpr int64_t kChunk = 16;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int64_t first = t * kChunk; first < data.rows; first += threads * kChunk)
        work(first, std::min(first + kChunk, data.rows));
    });
  }
  for (std::thread& thread : pool) thread.join();
}

std::vector<uint16_t> read_bits(const void* device, size_t count) {
  std::vector<uint16_t> bits(count);
  EPIC_CUDA_CHECK(cudaMemcpy(bits.data(), device, count * 2, cudaMemcpyDeviceToHost));
  return bits;
}

void run_case(const Case& c, uint64_t seed, bool checks_only, cudaStream_t stream) {
  const CaseData data = make_data(c, seed);
  DeviceBuffer qkv(data.qkv_bits.size() * 2), key_pool(data.key_bits.size() * 2),
      value_pool(data.value_bits.size() * 2);
  DeviceBuffer tables(std::max<size_t>(data.tables.size(), 1) * 4),
      row_sequence(data.row_sequence.size() * 4), positions(data.positions.size() * 4);
  const size_t out_elements = static_cast<size_t>(data.rows * data.q_dim);
  DeviceBuffer out((out_elements + kGuardRows * data.q_dim) * 2);
  EPIC_CUDA_CHECK(cudaMemcpy(qkv.get(), data.qkv_bits.data(), qkv.bytes(), cudaMemcpyHostToDevice));
  EPIC_CUDA_CHECK(cudaMemcpy(key_pool.get(), data.key_bits.data(), key_pool.bytes(), cudaMemcpyHostToDevice));
  EPIC_CUDA_CHECK(
      cudaMemcpy(value_pool.get(), data.value_bits.data(), value_pool.bytes(), cudaMemcpyHostToDevice));
  EPIC_CUDA_CHECK(
      cudaMemcpy(tables.get(), data.tables.data(), data.tables.size() * 4, cudaMemcpyHostToDevice));
  EPIC_CUDA_CHECK(
      cudaMemcpy(row_sequence.get(), data.row_sequence.data(), row_sequence.bytes(), cudaMemcpyHostToDevice));
  EPIC_CUDA_CHECK(
      cudaMemcpy(positions.get(), data.positions.data(), positions.bytes(), cudaMemcpyHostToDevice));
  EPIC_CUDA_CHECK(cudaMemset(out.get(), 0xff, out.bytes()));  // NaN: an unwritten element fails

  const auto call = [&] {
    attention(qkv.get(), ScalarType::kBF16, key_pool.get(), value_pool.get(), tables.get<int32_t>(),
              data.max_blocks, row_sequence.get<int32_t>(), positions.get<int32_t>(), data.rows, c.heads,
              c.kv_heads, c.head_dim, out.get(), stream);
  };
  call();
  EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<uint16_t> got_bits = read_bits(out.get(), out_elements + kGuardRows * data.q_dim);

  std::vector<float> want, scale;
  reference(c, data, want, scale);
  double worst = 0.0;
  int64_t bad = 0;
  for (size_t i = 0; i < out_elements; ++i) {
    const double got = from_bf16_bits(got_bits[i]);
    // Padding rows (scale 0) must be exactly 0; others within the bound. NaN fails both.
    const double error =
        scale[i] > 0.0f ? std::fabs(got - want[i]) / scale[i] : (got == 0.0 ? 0.0 : INFINITY);
    if (!(error <= kTolerance)) {
      if (bad < 5) {
        const int64_t row = static_cast<int64_t>(i) / data.q_dim;
        std::printf(
            "    row %lld (sequence %d, position %d) head %lld dim %lld: got %g, want %g (scale %g)\n",
            static_cast<long long>(row), data.row_sequence[row], data.positions[row],
            static_cast<long long>((static_cast<int64_t>(i) % data.q_dim) / c.head_dim),
            static_cast<long long>(static_cast<int64_t>(i) % c.head_dim), got, want[i], scale[i]);
      }
      ++bad;
    }
    if (!(error <= worst)) worst = error;
  }
  int64_t guards_written = 0;
  for (size_t i = out_elements; i < got_bits.size(); ++i) guards_written += got_bits[i] != 0xffff;
  const bool ok = bad == 0 && guards_written == 0;
  std::printf("  %-44s rows %6lld  worst %.2e (x sum p|v|, limit %.0e)  %s\n", c.name.c_str(),
              static_cast<long long>(data.rows), worst, kTolerance, ok ? "ok" : "WRONG");
  if (bad != 0) std::printf("    %lld of %zu elements off\n", static_cast<long long>(bad), out_elements);
  if (guards_written != 0)
    std::printf("    %lld elements past out's last row were written\n",
                static_cast<long long>(guards_written));
  if (!ok) ++g_failures;

  // The same call captured in a graph and replayed gives the same bits (decode steps are captured).
  {
    EPIC_CUDA_CHECK(cudaMemset(out.get(), 0xff, out.bytes()));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t graph_exec = nullptr;
    EPIC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    call();
    EPIC_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    EPIC_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));
    EPIC_CUDA_CHECK(cudaGraphLaunch(graph_exec, stream));
    EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<uint16_t> replayed = read_bits(out.get(), got_bits.size());
    if (replayed != got_bits) {
      std::printf("    WRONG: the graph replay differs from the direct call\n");
      ++g_failures;
    }
    cudaGraphExecDestroy(graph_exec);
    cudaGraphDestroy(graph);
  }

  if (checks_only || c.metric == Metric::kNone) return;
  for (int i = 0; i < kWarmupCalls; ++i) call();
  cudaEvent_t start, stop;
  EPIC_CUDA_CHECK(cudaEventCreate(&start));
  EPIC_CUDA_CHECK(cudaEventCreate(&stop));
  EPIC_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < kTimedCalls; ++i) call();
  EPIC_CUDA_CHECK(cudaEventRecord(stop, stream));
  EPIC_CUDA_CHECK(cudaEventSynchronize(stop));
  float total_ms = 0.0f;
  EPIC_CUDA_CHECK(cudaEventElapsedTime(&total_ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const double seconds = total_ms / 1e3 / kTimedCalls;
  double visible_keys = 0.0;  // sum over rows of the keys each row attends
  for (int32_t position : data.positions) visible_keys += position >= 0 ? position + 1.0 : 0.0;
  if (c.metric == Metric::kFlops) {
    const double flops = 4.0 * static_cast<double>(c.heads * c.head_dim) * visible_keys;  // QK^T and PV
    std::printf("    %.3f ms  %.1f TFLOP/s (causal FLOPs 4 x heads x head_dim x keys seen)\n", seconds * 1e3,
                flops / seconds / 1e12);
  } else {
    const double bytes =
        2.0 * 2.0 * static_cast<double>(c.kv_heads * c.head_dim) * visible_keys;  // K and V, bf16
    std::printf("    %.3f us  %.0f GB/s (K and V bytes of the keys seen, each once per kv head)\n",
                seconds * 1e6, bytes / seconds / 1e9);
  }
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  const auto add = [&](std::string name, std::vector<Sequence> sequences, Metric metric = Metric::kNone) {
    Case c;
    c.name = std::move(name);
    c.sequences = std::move(sequences);
    c.metric = metric;
    cases.push_back(c);
    return &cases.back();
  };
  add("prefill 1 x 300", {{300, 0}});
  add("prefill 3 sequences 17/64/100 in one batch", {{17, 0}, {64, 0}, {100, 0}});
  add("prefill chunk of 100 after 1000 cached", {{100, 1000}});
  add("prefill 17/64/100, rows shuffled (per-row path)", {{17, 0}, {64, 0}, {100, 0}})->shuffle_rows = true;
  {
    Case* c = add("prefill 1 x 300, 8/8 heads, head_dim 64", {{300, 0}});
    c->heads = 8, c->kv_heads = 8, c->head_dim = 64;
  }
  add("decode ragged 6 rows + 3 padding rows", {{1, 0}, {1, 15}, {1, 16}, {1, 63}, {1, 64}, {1, 1000}})
      ->padding_rows = 3;
  {
    Case* c = add("decode 16/1 heads, head_dim 64, 5 rows", {{1, 100}, {1, 4}, {3, 200}});
    c->heads = 16, c->kv_heads = 1, c->head_dim = 64;
  }
  add("prefill 1 x 4096", {{4096, 0}}, Metric::kFlops);
  add("decode 64 x 2048 keys", std::vector<Sequence>(64, Sequence{1, 2047}), Metric::kBandwidth);
  add("decode 1 x 32768 keys", {{1, 32767}}, Metric::kBandwidth);
  return cases;
}

}  // namespace
}  // namespace epic::cuda_kernels

int main(int argc, char** argv) {
  using namespace epic::cuda_kernels;
  uint64_t seed = std::random_device{}();
  bool checks_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (flag == "--checks-only") {
      checks_only = true;
    } else {
      std::fprintf(stderr, "usage: %s [--seed N] [--checks-only]\n", argv[0]);
      return 2;
    }
  }
  try {
    std::printf("seed %llu (replay with --seed)\n", static_cast<unsigned long long>(seed));
    cudaStream_t stream = nullptr;
    EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    uint64_t case_seed = seed;
    for (const Case& c : all_cases()) run_case(c, case_seed++, checks_only, stream);
    EPIC_CUDA_CHECK(cudaStreamDestroy(stream));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
  std::printf("\n%s (%d failed checks)\n", g_failures == 0 ? "PASS" : "FAIL", g_failures);
  return g_failures == 0 ? 0 : 1;
}
