// Micro-benchmark of the grouped expert FFN at Qwen3-30B-A3B shapes (H 2048, I 768, 128 experts,
// top-8, bf16): expert_ffn_device_scheduled (its size rule, and each of its BF16 kernels forced,
// expert_ffn_variants.h) and expert_ffn_cublas (per expert and grouped) per token count, each
// checked against an fp32 host computation. First it checks every kernel of the GEMM group (both
// expert FFN paths and every device kernel, every type pair, ragged shapes, graph capture,
// linear_f32) on small shapes, element by element. Exit status 1 on any failed check.
// Usage: epic_expert_ffn_bench [--seed N] [--quick (sizes up to 512 tokens) | --tokens N,N,... |
// --checks-only]
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/bench/bench_support.h"
#include "kernels/cuda/cublas_gemm.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/expert_ffn_variants.h"
#include "kernels/cuda/gemm_lanes.h"
#include "tests/kernels/reference_linear.h"

namespace epic::cuda_kernels {
namespace {

constexpr int64_t kHidden = 2048;
constexpr int64_t kInter = 768;
constexpr int64_t kNumExperts = 128;
constexpr int64_t kTopK = 8;
constexpr int kWarmupCalls = 3;
constexpr int kTimedCalls = 20;
constexpr int64_t kMaxCheckedRows = 128;  // host fp32 reference rows per benchmark size
constexpr double kBenchTolerance = 2e-2;  // relative L2, bf16 activations and outputs

int g_failures = 0;

using bench::DeviceBuffer;
using bench::from_bf16_bits;
using bench::to_bf16_bits;

// Host values (floats) stored on the device as `type`; for bf16 the host copy is rounded too, so
// the reference sees exactly the device's inputs.
struct TypedArray {
  ScalarType type;
  std::vector<float> host;
  DeviceBuffer device;
  TypedArray(ScalarType array_type, std::vector<float> values)
      : type(array_type), host(std::move(values)), device(host.size() * scalar_size(array_type)) {
    if (type == ScalarType::kBF16) {
      std::vector<uint16_t> bits(host.size());
      for (size_t i = 0; i < host.size(); ++i) {
        bits[i] = to_bf16_bits(host[i]);
        host[i] = from_bf16_bits(bits[i]);
      }
      EPIC_CUDA_CHECK(cudaMemcpy(device.get(), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
    } else {
      EPIC_CUDA_CHECK(cudaMemcpy(device.get(), host.data(), host.size() * 4, cudaMemcpyHostToDevice));
    }
  }
};

std::vector<float> read_back(const void* device, ScalarType type, size_t count) {
  std::vector<float> values(count);
  if (type == ScalarType::kBF16) {
    std::vector<uint16_t> bits(count);
    EPIC_CUDA_CHECK(cudaMemcpy(bits.data(), device, count * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < count; ++i) values[i] = from_bf16_bits(bits[i]);
  } else {
    EPIC_CUDA_CHECK(cudaMemcpy(values.data(), device, count * 4, cudaMemcpyDeviceToHost));
  }
  return values;
}

std::vector<float> random_values(std::mt19937_64& rng, size_t count, float scale) {
  std::uniform_real_distribution<float> uniform(-scale, scale);
  std::vector<float> values(count);
  for (float& value : values) value = uniform(rng);
  return values;
}

float silu(float value) { return value / (1.0f + std::exp(-value)); }

// fp32 reference of one row: y[h] = sum_j silu(x . gate_j) * (x . up_j) * down[h, j].
void reference_row(const float* x, const float* gate_up, const float* down, int64_t hidden, int64_t inter,
                   float* y) {
  std::vector<float> intermediate(inter);
  for (int64_t j = 0; j < inter; ++j) {
    float gate = 0.0f;
    float up = 0.0f;
    for (int64_t k = 0; k < hidden; ++k) {
      gate += x[k] * gate_up[j * hidden + k];
      up += x[k] * gate_up[(inter + j) * hidden + k];
    }
    intermediate[j] = silu(gate) * up;
  }
  for (int64_t h = 0; h < hidden; ++h) {
    float sum = 0.0f;
    for (int64_t j = 0; j < inter; ++j) sum += intermediate[j] * down[h * inter + j];
    y[h] = sum;
  }
}

// Each element within tolerance x the RMS of its reference row (dot products cancel, so a plain
// relative bound would fail on near-zero elements); NaN (an unwritten, NaN-filled output) fails.
bool rows_match(const std::string& name, const float* got, const float* want, int64_t rows, int64_t cols,
                double tolerance) {
  double worst = 0.0;
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double sum_squares = 0.0;
    for (int64_t c = 0; c < cols; ++c)
      sum_squares += static_cast<double>(want[r * cols + c]) * want[r * cols + c];
    const double rms = std::sqrt(sum_squares / static_cast<double>(cols)) + 1e-30;
    for (int64_t c = 0; c < cols; ++c) {
      const double error = std::fabs(static_cast<double>(got[r * cols + c]) - want[r * cols + c]) / rms;
      if (!(error <= tolerance)) ++bad;
      if (!(error <= worst)) worst = error;  // NaN sticks
    }
  }
  std::printf("  %-58s worst %.2e (x row RMS, limit %.0e)  %s\n", name.c_str(), worst, tolerance,
              bad == 0 ? "ok" : "WRONG");
  if (bad != 0) {
    std::printf("    %lld of %lld elements off\n", static_cast<long long>(bad),
                static_cast<long long>(rows * cols));
    ++g_failures;
  }
  return bad == 0;
}

// One way to run the expert FFN: cuBLAS, or the device-scheduled entry with a kernel forced
// (kAuto: the backend's size rule) and the down launch allowed to overlap gate_up or not.
struct FfnPath {
  bool cublas = false;
  ExpertFfnKernel kernel = ExpertFfnKernel::kAuto;
  bool overlap = true;
  bool grouped = false;  // cublas: with pointer scratch, one grouped cuBLAS call per GEMM pass
  int lanes = 0;         // cublas: > 0 forces the per-expert loop over this many streams
  bool batched = false;  // cublas: expert_ffn_batched alone (windows or padded buckets)
  std::string name() const {
    if (cublas && batched) return "batched";
    if (cublas && lanes > 0) return "loop-" + std::to_string(lanes) + "lanes";
    if (cublas) return grouped ? "grouped" : "cublas";
    return std::string(expert_ffn_kernel_name(kernel)) + (overlap ? "" : "-seq");
  }
};

// expert_ffn_cublas's grouped-GEMM pointer scratch (device, and pinned host staging), made once
// and kept for the program's life; room for every plan here (3 * (2 * chunks + 1) per expert).
void attach_gemm_pointers(ExpertFfnArgs& args) {
  constexpr int64_t kCapacity = int64_t{1} << 16;
  static void** device = nullptr;
  static void** host = nullptr;
  if (device == nullptr) {
    EPIC_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&device), kCapacity * sizeof(void*)));
    EPIC_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host), kCapacity * sizeof(void*)));
  }
  args.device_pointers = device;
  args.host_pointers = host;
  args.pointer_capacity = kCapacity;
}

constexpr int kMaxBenchLanes = 8;

// expert_ffn_batched's scratch: one device buffer, grown on demand and kept for the program's life.
void* batched_scratch(size_t bytes) {
  static void* buffer = nullptr;
  static size_t capacity = 0;
  if (bytes > capacity) {
    if (buffer != nullptr) EPIC_CUDA_CHECK(cudaFree(buffer));  // cudaFree waits for the device
    EPIC_CUDA_CHECK(cudaMalloc(&buffer, bytes));
    capacity = bytes;
  }
  return buffer;
}

// Returns whether expert_ffn_cublas's grouped calls ran. Timed back-to-back calls rewrite the
// pinned pointer staging while an earlier copy may be pending: the same bytes each time.
bool run_path(const FfnPath& path, const ExpertFfnArgs& args, const int32_t* host_offsets,
              const int32_t* host_local, cublasHandle_t cublas, cudaStream_t stream) {
  if (path.cublas && path.batched) {
    ExpertFfnArgs batched_args = args;
    attach_gemm_pointers(batched_args);
    batched_args.batched_scratch = batched_scratch;
    if (expert_ffn_batched(batched_args, host_offsets, host_local, cublas, stream)) return true;
    expert_ffn_cublas(args, host_offsets, host_local, cublas, stream);  // what the backend does then
    return false;
  }
  if (path.cublas) {
    ExpertFfnArgs cublas_args = args;
    if (path.grouped) attach_gemm_pointers(cublas_args);
    if (path.lanes > 0) {
      static GemmLanePool pool(kMaxBenchLanes - 1);  // kept for the program's life
      cublas_args.per_expert = true;
      cublas_args.lane_pool = &pool;
      cublas_args.side_lane_count = path.lanes - 1;
    }
    return expert_ffn_cublas(cublas_args, host_offsets, host_local, cublas, stream);
  }
  expert_ffn_device_scheduled_with(args, path.kernel, path.overlap, stream);
  return false;
}

// The device paths checked on every shape: each BF16 kernel (others fall back to SIMT, and an
// ineligible shape from streaming to tiled), and the streaming kernels without the phase overlap.
std::vector<FfnPath> device_paths(bool bf16_pair) {
  std::vector<FfnPath> paths = {FfnPath{}};
  if (!bf16_pair) return paths;
  for (ExpertFfnKernel kernel :
       {ExpertFfnKernel::kTiled16, ExpertFfnKernel::kTiled64, ExpertFfnKernel::kStream8,
        ExpertFfnKernel::kStream16, ExpertFfnKernel::kStream32, ExpertFfnKernel::kStream8Wide4,
        ExpertFfnKernel::kStream16Wide4, ExpertFfnKernel::kStream32Wide4, ExpertFfnKernel::kStream32Wide8,
        ExpertFfnKernel::kStream16Wide4Down8, ExpertFfnKernel::kStream32Wide4Down8}) {
    paths.push_back(FfnPath{false, kernel, true});
  }
  paths.push_back(FfnPath{false, ExpertFfnKernel::kStream8, false});
  paths.push_back(FfnPath{false, ExpertFfnKernel::kStream32, false});
  return paths;
}

// ---- correctness on small ragged shapes -----------------------------------------------------------

struct SmallCase {
  int64_t hidden, inter;
  std::vector<int32_t> group_sizes;  // per expert
  std::vector<int32_t> local_index;  // per expert, -1: not hosted (then 0 rows)
  int64_t num_local;
};

void check_expert_ffn_case(const SmallCase& shape, ScalarType act_type, ScalarType weight_type,
                           const FfnPath& path, std::mt19937_64& rng, cudaStream_t stream,
                           cublasHandle_t cublas) {
  const bool use_cublas = path.cublas;
  const int64_t num_experts = static_cast<int64_t>(shape.group_sizes.size());
  std::vector<int32_t> offsets(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) offsets[e + 1] = offsets[e] + shape.group_sizes[e];
  const int64_t rows = offsets[num_experts];
  const int64_t hidden = shape.hidden;
  const int64_t inter = shape.inter;

  TypedArray x(act_type, random_values(rng, rows * hidden, 1.0f));
  TypedArray gate_up(weight_type,
                     random_values(rng, shape.num_local * 2 * inter * hidden, 1.0f / std::sqrt(hidden)));
  TypedArray down(weight_type, random_values(rng, shape.num_local * hidden * inter, 1.0f / std::sqrt(inter)));
  DeviceBuffer device_offsets(offsets.size() * 4);
  DeviceBuffer device_local(shape.local_index.size() * 4);
  EPIC_CUDA_CHECK(
      cudaMemcpy(device_offsets.get(), offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
  EPIC_CUDA_CHECK(cudaMemcpy(device_local.get(), shape.local_index.data(), shape.local_index.size() * 4,
                             cudaMemcpyHostToDevice));
  // y gets guard rows past its end: a padded row written out would change them.
  constexpr int64_t kGuardRows = 17;
  const size_t act_size = scalar_size(act_type);
  DeviceBuffer intermediate(rows * inter * act_size);
  DeviceBuffer y((rows + kGuardRows) * hidden * act_size);
  EPIC_CUDA_CHECK(cudaMemset(intermediate.get(), 0xff, intermediate.bytes()));  // NaN in f32 and bf16
  EPIC_CUDA_CHECK(cudaMemset(y.get(), 0xff, y.bytes()));

  ExpertFfnArgs args;
  args.x = x.device.get();
  args.expert_offsets = device_offsets.get<int32_t>();
  args.gate_up = gate_up.device.get();
  args.down = down.device.get();
  args.local_index = device_local.get<int32_t>();
  args.intermediate = intermediate.get();
  args.y = y.get();
  args.rows = rows;
  args.num_experts = num_experts;
  args.num_local = shape.num_local;
  args.hidden = hidden;
  args.inter = inter;
  args.act_type = act_type;
  args.weight_type = weight_type;
  const bool ran_grouped = run_path(path, args, offsets.data(), shape.local_index.data(), cublas, stream);
  EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
  // The grouped calls run wherever every matrix start is 16-byte aligned (bf16 rows of H and I
  // elements); elsewhere expert_ffn_cublas falls back to its per-expert loop.
  // The batched paths have the same alignment rule (and are called alone here).
  const bool expect_grouped = (path.grouped || path.batched) && hidden % 8 == 0 && inter % 8 == 0;
  if (ran_grouped != expect_grouped) {
    std::printf("    WRONG: %s: expected %s, ran %s\n", path.name().c_str(),
                expect_grouped ? "the grouped calls" : "the per-expert loop",
                ran_grouped ? "the grouped calls" : "the per-expert loop");
    ++g_failures;
  }

  std::vector<float> want(rows * hidden);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int32_t local = shape.local_index[e];
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      reference_row(&x.host[r * hidden], &gate_up.host[local * 2 * inter * hidden],
                    &down.host[local * hidden * inter], hidden, inter, &want[r * hidden]);
    }
  }
  const std::vector<float> got = read_back(y.get(), act_type, (rows + kGuardRows) * hidden);
  // bf16: the intermediate and the output are rounded to bf16 (2^-9 each), and cuBLAS also rounds
  // gate x and up x before silu, so its bound is looser. f32: summation order only.
  const double tolerance = act_type == ScalarType::kF32 ? 2e-5 : use_cublas ? 3e-2 : 2e-2;
  const std::string name = path.name() + " " + scalar_name(act_type) + " x " + scalar_name(weight_type) +
                           " H" + std::to_string(hidden) + " I" + std::to_string(inter) + " rows " +
                           std::to_string(rows);
  rows_match(name, got.data(), want.data(), rows, hidden, tolerance);
  int64_t guards_changed = 0;
  for (int64_t i = rows * hidden; i < (rows + kGuardRows) * hidden; ++i)
    guards_changed += !std::isnan(got[i]);
  if (guards_changed != 0) {
    std::printf("    WRONG: %lld elements past y's last row were written\n",
                static_cast<long long>(guards_changed));
    ++g_failures;
  }

  if (!use_cublas) {
    // The same call captured in a graph and replayed must give the same bits.
    std::vector<float> direct = got;
    EPIC_CUDA_CHECK(cudaMemset(y.get(), 0xff, y.bytes()));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t graph_exec = nullptr;
    EPIC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    run_path(path, args, nullptr, nullptr, cublas, stream);
    EPIC_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    EPIC_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));
    EPIC_CUDA_CHECK(cudaGraphLaunch(graph_exec, stream));
    EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> replayed = read_back(y.get(), act_type, rows * hidden);
    const bool same = std::memcmp(replayed.data(), direct.data(), replayed.size() * sizeof(float)) == 0;
    if (!same) {
      std::printf("    WRONG: the graph replay differs from the direct call\n");
      ++g_failures;
    }
    cudaGraphExecDestroy(graph_exec);
    cudaGraphDestroy(graph);
  }

  if (!use_cublas && path.kernel != ExpertFfnKernel::kAuto && rows > 1) {
    // A row computed alone (the same kernel, its expert's only row) must give the same bits: no
    // result may depend on the other rows of its group or on where it sits in a tile or chunk.
    int64_t expert = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (shape.group_sizes[e] > shape.group_sizes[expert]) expert = e;
    }
    const int64_t row = offsets[expert + 1] - 1;
    std::vector<int32_t> one_offsets(num_experts + 1, 0);
    for (int64_t e = expert + 1; e <= num_experts; ++e) one_offsets[e] = 1;
    DeviceBuffer one_x(hidden * act_size), one_intermediate(inter * act_size), one_y(hidden * act_size);
    DeviceBuffer one_device_offsets(one_offsets.size() * 4);
    EPIC_CUDA_CHECK(cudaMemcpy(one_x.get(),
                               static_cast<const char*>(x.device.get()) + row * hidden * act_size,
                               hidden * act_size, cudaMemcpyDeviceToDevice));
    EPIC_CUDA_CHECK(cudaMemcpy(one_device_offsets.get(), one_offsets.data(), one_offsets.size() * 4,
                               cudaMemcpyHostToDevice));
    ExpertFfnArgs one = args;
    one.x = one_x.get();
    one.expert_offsets = one_device_offsets.get<int32_t>();
    one.intermediate = one_intermediate.get();
    one.y = one_y.get();
    one.rows = 1;
    run_path(path, one, nullptr, nullptr, cublas, stream);
    EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> alone = read_back(one_y.get(), act_type, hidden);
    if (std::memcmp(alone.data(), &got[row * hidden], hidden * sizeof(float)) != 0) {
      std::printf("    WRONG: row %lld computed alone differs from the same row in its group\n",
                  static_cast<long long>(row));
      ++g_failures;
    }
  }
}

// y[r, o] = sum_k x[r, k] * w[o, k] in float64, rounded once to float: the reference of the linear
// checks (x [rows, in_dim], w [out_dim, in_dim], as the device reads them).
// y = x w^T in float64 (the op table's reference_linear) with the magnitude of each sum.
struct HostProduct {
  std::vector<double> y;
  std::vector<double> magnitude;
  std::vector<float> y_float() const { return std::vector<float>(y.begin(), y.end()); }
};
HostProduct host_linear_reference(const std::vector<float>& x, const std::vector<float>& w, int64_t rows,
                                  int64_t in_dim, int64_t out_dim) {
  HostProduct product{std::vector<double>(rows * out_dim), std::vector<double>(rows * out_dim)};
  kernel_test::reference_linear(x.data(), w.data(), rows, in_dim, out_dim, product.y.data(),
                                product.magnitude.data());
  return product;
}

// Every |got - want| <= tolerance * magnitude. An fp32 sum in any blocked order errs by at most
// (terms per partial sum + levels) x 2^-24 of sum |x_k w_k| (the op table's linear bound: 1e-5 at
// in = 2048); the row RMS, by contrast, can be far smaller than that sum and is no error scale.
bool products_match(const std::string& name, const std::vector<float>& got, const HostProduct& want,
                    double tolerance) {
  double worst = 0.0;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double error =
        std::fabs(static_cast<double>(got[i]) - want.y[i]) / std::max(want.magnitude[i], 1e-30);
    if (!(error <= tolerance)) ++bad;
    if (!(error <= worst)) worst = error;  // NaN sticks
  }
  std::printf("  %-58s worst %.2e (of sum |x w|, limit %.0e)  %s\n", name.c_str(), worst, tolerance,
              bad == 0 ? "ok" : "WRONG");
  if (bad != 0) {
    std::printf("    %lld of %zu elements off\n", static_cast<long long>(bad), got.size());
    ++g_failures;
  }
  return bad == 0;
}

// linear_f32 and, for bf16 weights, linear_f32_split against a float64 host product, every element.
void check_linear_f32(int64_t rows, int64_t in_dim, int64_t out_dim, ScalarType w_type, std::mt19937_64& rng,
                      cudaStream_t stream, cublasHandle_t cublas) {
  TypedArray x(ScalarType::kF32, random_values(rng, rows * in_dim, 1.0f));
  TypedArray w(w_type, random_values(rng, out_dim * in_dim, 1.0f));
  const HostProduct want = host_linear_reference(x.host, w.host, rows, in_dim, out_dim);
  const std::string shape = " x " + std::string(scalar_name(w_type)) + " rows " + std::to_string(rows) +
                            " in " + std::to_string(in_dim) + " out " + std::to_string(out_dim);
  DeviceBuffer y(rows * out_dim * 4);
  EPIC_CUDA_CHECK(cudaMemset(y.get(), 0xff, y.bytes()));
  linear_f32(x.device.get<float>(), w.device.get(), w_type, y.get<float>(), rows, in_dim, out_dim, stream);
  EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> got = read_back(y.get(), ScalarType::kF32, rows * out_dim);
  products_match("linear_f32" + shape, got, want, 1e-5);
  if (w_type != ScalarType::kBF16) return;
  DeviceBuffer scratch(3 * rows * in_dim * 2);
  EPIC_CUDA_CHECK(cudaMemset(y.get(), 0xff, y.bytes()));
  linear_f32_split(x.device.get<float>(), w.device.get(), y.get<float>(), rows, in_dim, out_dim,
                   scratch.get(), cublas, stream);
  EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
  got = read_back(y.get(), ScalarType::kF32, rows * out_dim);
  products_match("linear_f32_split" + shape, got, want, 1e-5);
}

// linear_skinny (bf16 x and w, f32 or bf16 y) against a float64 host product, every element.
void check_linear_skinny(int64_t rows, int64_t in_dim, int64_t out_dim, ScalarType y_type,
                         std::mt19937_64& rng, cudaStream_t stream) {
  TypedArray x(ScalarType::kBF16, random_values(rng, rows * in_dim, 1.0f));
  TypedArray w(ScalarType::kBF16, random_values(rng, out_dim * in_dim, 1.0f));
  const HostProduct want = host_linear_reference(x.host, w.host, rows, in_dim, out_dim);
  DeviceBuffer y(rows * out_dim * 4);
  EPIC_CUDA_CHECK(cudaMemset(y.get(), 0xff, y.bytes()));
  linear_skinny(x.device.get(), w.device.get(), y.get(), y_type, rows, in_dim, out_dim, stream);
  EPIC_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<float> got = read_back(y.get(), y_type, rows * out_dim);
  const std::string name = "linear_skinny to " + std::string(scalar_name(y_type)) + " rows " +
                           std::to_string(rows) + " in " + std::to_string(in_dim) + " out " +
                           std::to_string(out_dim);
  if (y_type == ScalarType::kF32) {
    products_match(name, got, want, 1e-5);  // the sum order differs from the float64 reference
  } else {
    // plus one rounding of the result (2^-9 relative) on values up to ~10x the row RMS
    rows_match(name, got.data(), want.y_float().data(), rows, out_dim, 2e-2);
  }
}

void run_checks(std::mt19937_64& rng, cudaStream_t stream, cublasHandle_t cublas) {
  std::printf("correctness (fp32 host reference, every element)\n");
  // Ragged sizes; experts 1 and 4 are not hosted (0 rows), expert 5 is hosted with 0 rows; some
  // group spans several row tiles. The average group picks the 16-, 32- or 64-row kernel.
  const std::vector<int32_t> local_index = {2, -1, 0, 3, -1, 1, 4};
  const std::vector<SmallCase> cases = {
      {136, 72, {5, 0, 150, 1, 0, 0, 17}, local_index, 5},    // vector loads; cublas: 2I > H (chunked)
      {100, 37, {3, 0, 70, 16, 0, 0, 2}, local_index, 5},     // K not a multiple of 8: element loads
      {256, 72, {1, 0, 2, 1, 0, 0, 9}, local_index, 5},       // 13 rows: the 16-row kernel; cublas 2I <= H
      {96, 200, {4, 0, 33, 1, 0, 0, 0}, local_index, 5},      // I > H: cublas in two column chunks
      {136, 72, {60, 0, 130, 1, 0, 0, 200}, local_index, 5},  // average group > 48: 64-row tiles
      // Near-equal groups: the batched path's in-place windows (the last one shifted back), and
      // with 2I > H (G in scratch).
      {136, 72, {130, 0, 128, 136, 0, 0, 129}, local_index, 5},
      {96, 200, {66, 0, 64, 70, 0, 0, 65}, local_index, 5},
  };
  const ScalarType types[2] = {ScalarType::kBF16, ScalarType::kF32};
  for (const SmallCase& shape : cases) {
    for (ScalarType act : types) {
      for (ScalarType weight : types) {
        const bool bf16_pair = act == ScalarType::kBF16 && weight == ScalarType::kBF16;
        for (const FfnPath& path : device_paths(bf16_pair))
          check_expert_ffn_case(shape, act, weight, path, rng, stream, cublas);
      }
    }
    check_expert_ffn_case(shape, ScalarType::kBF16, ScalarType::kBF16, FfnPath{true}, rng, stream, cublas);
    check_expert_ffn_case(shape, ScalarType::kBF16, ScalarType::kBF16,
                          FfnPath{true, ExpertFfnKernel::kAuto, true, true}, rng, stream, cublas);
    check_expert_ffn_case(shape, ScalarType::kBF16, ScalarType::kBF16,
                          FfnPath{true, ExpertFfnKernel::kAuto, true, false, 0, true}, rng, stream, cublas);
    // The per-expert loop on one lane and spread over three (the experts land on different streams).
    for (const int lanes : {1, 3}) {
      check_expert_ffn_case(shape, ScalarType::kBF16, ScalarType::kBF16,
                            FfnPath{true, ExpertFfnKernel::kAuto, true, false, lanes}, rng, stream, cublas);
    }
  }
  // Many experts (the streaming kernel's chunk search reads 128 per round), every 7th not hosted,
  // groups of 0 .. 20 rows: each kernel on BF16 only.
  SmallCase many{256, 40, {}, {}, 0};
  std::uniform_int_distribution<int32_t> group_rows(0, 20);
  for (int64_t e = 0; e < 300; ++e) {
    const bool hosted = e % 7 != 3;
    many.local_index.push_back(hosted ? static_cast<int32_t>(many.num_local++) : -1);
    many.group_sizes.push_back(hosted && e % 5 != 0 ? group_rows(rng) : 0);
  }
  for (const FfnPath& path : device_paths(true))
    check_expert_ffn_case(many, ScalarType::kBF16, ScalarType::kBF16, path, rng, stream, cublas);
  // Counts 1 .. 20 (too uneven for the windows) make ~9 buckets of the padded plan.
  check_expert_ffn_case(many, ScalarType::kBF16, ScalarType::kBF16,
                        FfnPath{true, ExpertFfnKernel::kAuto, true, false, 0, true}, rng, stream, cublas);
  for (ScalarType w_type : types) {
    check_linear_f32(1, 100, 130, w_type, rng, stream, cublas);
    check_linear_f32(70, 257, 67, w_type, rng, stream, cublas);
    check_linear_f32(3, 2048, 1000, w_type, rng, stream, cublas);
    check_linear_f32(300, 2048, 128, w_type, rng, stream, cublas);  // a router at prefill size
  }
  // Every row count, an output count not a multiple of the 8-output group, more groups than blocks
  // (stride), an input longer than 256 chunks (threads loop), in past 48 KiB of shared x.
  for (ScalarType y_type : types) {
    for (int64_t rows = 1; rows <= kSkinnyMaxRows; ++rows) {
      check_linear_skinny(rows, 264, 77, y_type, rng, stream);
      check_linear_skinny(rows, 2048, 16500, y_type, rng, stream);
      check_linear_skinny(rows, 4096, 40, y_type, rng, stream);
      check_linear_skinny(rows, 24576, 24, y_type, rng, stream);
    }
  }
}

// ---- benchmark at Qwen3-30B-A3B shapes ----------------------------------------------------------------

__global__ void fill_random_bf16(__nv_bfloat16* out, int64_t count, uint64_t seed, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = seed + static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float unit = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    out[i] = __float2bfloat16_rn((2.0f * unit - 1.0f) * scale);
  }
}

void fill_device(void* out, int64_t count, uint64_t seed, float scale) {
  fill_random_bf16<<<4096, 256>>>(static_cast<__nv_bfloat16*>(out), count, seed, scale);
  EPIC_CUDA_CHECK_LAUNCH();
}

template <typename Call>
float median_ms(Call&& call, cudaStream_t stream) {
  cudaEvent_t start, stop;
  EPIC_CUDA_CHECK(cudaEventCreate(&start));
  EPIC_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < kWarmupCalls; ++i) call();
  std::vector<float> times;
  for (int i = 0; i < kTimedCalls; ++i) {
    EPIC_CUDA_CHECK(cudaEventRecord(start, stream));
    call();
    EPIC_CUDA_CHECK(cudaEventRecord(stop, stream));
    EPIC_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    EPIC_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void run_benchmarks(const std::vector<int64_t>& token_counts, uint64_t seed, cudaStream_t stream,
                    cublasHandle_t cublas) {
  const int64_t gate_up_elements = kNumExperts * 2 * kInter * kHidden;
  const int64_t down_elements = kNumExperts * kHidden * kInter;
  DeviceBuffer gate_up(gate_up_elements * 2);
  DeviceBuffer down(down_elements * 2);
  fill_device(gate_up.get(), gate_up_elements, seed * 3 + 1, 1.0f / std::sqrt(static_cast<float>(kHidden)));
  fill_device(down.get(), down_elements, seed * 3 + 2, 1.0f / std::sqrt(static_cast<float>(kInter)));
  std::vector<int32_t> local_index(kNumExperts);
  for (int64_t e = 0; e < kNumExperts; ++e) local_index[e] = static_cast<int32_t>(e);
  DeviceBuffer device_local(kNumExperts * 4);
  EPIC_CUDA_CHECK(
      cudaMemcpy(device_local.get(), local_index.data(), kNumExperts * 4, cudaMemcpyHostToDevice));

  std::printf(
      "\nQwen3-30B-A3B expert FFN (H %lld, I %lld, %lld experts, top-%lld, bf16), median of %d calls\n",
      static_cast<long long>(kHidden), static_cast<long long>(kInter), static_cast<long long>(kNumExperts),
      static_cast<long long>(kTopK), kTimedCalls);
  std::printf("%8s %8s %8s %-12s %10s %12s %9s %9s %10s\n", "tokens", "rows", "experts", "path", "ms",
              "weight MB", "GB/s", "TFLOP/s", "rel L2");
  std::mt19937_64 rng(seed);
  for (const int64_t tokens : token_counts) {
    // Each token picks kTopK distinct experts uniformly.
    std::vector<int32_t> group_sizes(kNumExperts, 0);
    std::vector<int32_t> experts(kNumExperts);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t e = 0; e < kNumExperts; ++e) experts[e] = static_cast<int32_t>(e);
      for (int64_t j = 0; j < kTopK; ++j) {
        std::uniform_int_distribution<int64_t> pick(j, kNumExperts - 1);
        std::swap(experts[j], experts[pick(rng)]);
        ++group_sizes[experts[j]];
      }
    }
    std::vector<int32_t> offsets(kNumExperts + 1, 0);
    int64_t active_experts = 0;
    int64_t checked_expert = 0;
    for (int64_t e = 0; e < kNumExperts; ++e) {
      offsets[e + 1] = offsets[e] + group_sizes[e];
      active_experts += group_sizes[e] > 0;
      if (group_sizes[e] > group_sizes[checked_expert]) checked_expert = e;
    }
    const int64_t rows = tokens * kTopK;

    DeviceBuffer x(rows * kHidden * 2);
    DeviceBuffer intermediate(rows * kInter * 2);
    DeviceBuffer y(rows * kHidden * 2);
    DeviceBuffer device_offsets((kNumExperts + 1) * 4);
    fill_device(x.get(), rows * kHidden, seed * 7 + static_cast<uint64_t>(tokens), 1.0f);
    EPIC_CUDA_CHECK(
        cudaMemcpy(device_offsets.get(), offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
    ExpertFfnArgs args;
    args.x = x.get();
    args.expert_offsets = device_offsets.get<int32_t>();
    args.gate_up = gate_up.get();
    args.down = down.get();
    args.local_index = device_local.get<int32_t>();
    args.intermediate = intermediate.get();
    args.y = y.get();
    args.rows = rows;
    args.num_experts = kNumExperts;
    args.num_local = kNumExperts;
    args.hidden = kHidden;
    args.inter = kInter;

    // The host reference for (up to kMaxCheckedRows of) the expert with the most rows.
    const int64_t check_begin = offsets[checked_expert];
    const int64_t check_rows = std::min<int64_t>(group_sizes[checked_expert], kMaxCheckedRows);
    const std::vector<float> x_rows = read_back(static_cast<uint16_t*>(x.get()) + check_begin * kHidden,
                                                ScalarType::kBF16, check_rows * kHidden);
    const std::vector<float> expert_gate_up =
        read_back(static_cast<uint16_t*>(gate_up.get()) + checked_expert * 2 * kInter * kHidden,
                  ScalarType::kBF16, 2 * kInter * kHidden);
    const std::vector<float> expert_down =
        read_back(static_cast<uint16_t*>(down.get()) + checked_expert * kHidden * kInter, ScalarType::kBF16,
                  kHidden * kInter);
    std::vector<float> want(check_rows * kHidden);
    for (int64_t r = 0; r < check_rows; ++r) {
      reference_row(&x_rows[r * kHidden], expert_gate_up.data(), expert_down.data(), kHidden, kInter,
                    &want[r * kHidden]);
    }

    const double weight_bytes = static_cast<double>(active_experts) * 3 * kInter * kHidden * 2;
    const double flops = 2.0 * static_cast<double>(rows) * 3 * kInter * kHidden;
    // auto: the backend's rule; then each device kernel forced, so one run on a card is enough
    // to set the rule (expert_ffn_device.cu, pick_bf16_kernel).
    std::vector<FfnPath> paths = device_paths(true);
    paths.push_back(FfnPath{true});
    paths.push_back(FfnPath{true, ExpertFfnKernel::kAuto, true, true});
    if (rows >= 4096) {  // the per-expert loop is for prefill sizes only
      for (const int lanes : {1, 2, 4, 8})
        paths.push_back(FfnPath{true, ExpertFfnKernel::kAuto, true, false, lanes});
      paths.push_back(FfnPath{true, ExpertFfnKernel::kAuto, true, false, 0, true});
    }
    for (const FfnPath& path : paths) {
      EPIC_CUDA_CHECK(cudaMemset(y.get(), 0xff, y.bytes()));
      bool ran_grouped = false;
      auto call = [&] {
        ran_grouped = run_path(path, args, offsets.data(), local_index.data(), cublas, stream);
      };
      const float ms = median_ms(call, stream);
      const std::vector<float> got = read_back(static_cast<uint16_t*>(y.get()) + check_begin * kHidden,
                                               ScalarType::kBF16, check_rows * kHidden);
      double error_squares = 0.0;
      double want_squares = 0.0;
      for (size_t i = 0; i < want.size(); ++i) {
        const double diff = static_cast<double>(got[i]) - want[i];
        error_squares += diff * diff;
        want_squares += static_cast<double>(want[i]) * want[i];
      }
      const double relative_l2 = std::sqrt(error_squares / want_squares);
      // false for NaN too; the grouped path must not fall back at these (aligned) shapes
      const bool ok = relative_l2 < kBenchTolerance && ran_grouped == (path.grouped || path.batched);
      if (!ok) ++g_failures;
      std::printf("%8lld %8lld %8lld %-12s %10.4f %12.1f %9.0f %9.1f %10.2e%s\n",
                  static_cast<long long>(tokens), static_cast<long long>(rows),
                  static_cast<long long>(active_experts), path.name().c_str(), ms, weight_bytes / 1e6,
                  weight_bytes / (ms * 1e6), flops / (ms * 1e9), relative_l2, ok ? "" : "  WRONG");
    }
  }
}

// The fp32 router's product (f32 rows x bf16 [128, 2048]) and a dense one: the SIMT kernels against
// the exact three-way split on tensor cores, per row count.
void run_linear_benchmarks(uint64_t seed, cudaStream_t stream, cublasHandle_t cublas) {
  std::printf("\nbf16 x bf16 linear at decode rows: cuBLAS vs linear_skinny, median of %d calls\n",
              kTimedCalls);
  std::printf("%8s %8s %6s %12s %12s %10s %8s\n", "rows", "out", "in", "cublas ms", "skinny ms",
              "skinny GB/s", "ratio");
  for (const auto& shape : {std::pair<int64_t, int64_t>{5120, 2048}, {2048, 4096}, {151936, 2048}}) {
    const int64_t out_dim = shape.first, in_dim = shape.second;  // (lambdas cannot capture bindings in C++17)
    DeviceBuffer w(out_dim * in_dim * 2);
    fill_device(w.get(), out_dim * in_dim, seed * 13 + static_cast<uint64_t>(out_dim), 0.02f);
    for (int64_t rows = 1; rows <= kSkinnyMaxRows; ++rows) {
      DeviceBuffer x(rows * in_dim * 2);
      DeviceBuffer y(rows * out_dim * 4);
      fill_device(x.get(), rows * in_dim, seed * 17 + static_cast<uint64_t>(rows), 1.0f);
      const float cublas_ms = median_ms(
          [&] {
            gemm_rows_nt(cublas, x.get(), CUDA_R_16BF, in_dim, w.get(), CUDA_R_16BF, out_dim, in_dim, y.get(),
                         CUDA_R_32F, out_dim, rows);
          },
          stream);
      const float skinny_ms = median_ms(
          [&] { linear_skinny(x.get(), w.get(), y.get(), ScalarType::kF32, rows, in_dim, out_dim, stream); },
          stream);
      std::printf("%8lld %8lld %6lld %12.4f %12.4f %10.0f %8.2f\n", static_cast<long long>(rows),
                  static_cast<long long>(out_dim), static_cast<long long>(in_dim), cublas_ms, skinny_ms,
                  static_cast<double>(out_dim * in_dim * 2) / (skinny_ms * 1e6), cublas_ms / skinny_ms);
    }
  }
  std::printf(
      "\nf32 x bf16 linear: linear_f32 (SIMT) vs linear_f32_split (3 bf16 GEMMs), median of %d calls\n",
      kTimedCalls);
  std::printf("%8s %6s %6s %12s %12s %8s\n", "rows", "out", "in", "simt ms", "split ms", "ratio");
  constexpr int64_t kIn = 2048;
  for (const int64_t out_dim : {int64_t{128}, int64_t{4096}}) {
    DeviceBuffer w(out_dim * kIn * 2);
    fill_device(w.get(), out_dim * kIn, seed * 11 + static_cast<uint64_t>(out_dim), 0.02f);
    for (const int64_t rows :
         {int64_t{1}, int64_t{16}, int64_t{64}, int64_t{256}, int64_t{2048}, int64_t{16384}}) {
      if (out_dim > 128 && rows > 2048) continue;
      DeviceBuffer x(rows * kIn * 4);
      DeviceBuffer y(rows * out_dim * 4);
      DeviceBuffer scratch(3 * rows * kIn * 2);
      EPIC_CUDA_CHECK(cudaMemset(x.get(), 0x3c, x.bytes()));  // timing only: finite values
      const float simt = median_ms(
          [&] {
            linear_f32(x.get<float>(), w.get(), ScalarType::kBF16, y.get<float>(), rows, kIn, out_dim,
                       stream);
          },
          stream);
      const float split = median_ms(
          [&] {
            linear_f32_split(x.get<float>(), w.get(), y.get<float>(), rows, kIn, out_dim, scratch.get(),
                             cublas, stream);
          },
          stream);
      std::printf("%8lld %6lld %6lld %12.4f %12.4f %8.2f\n", static_cast<long long>(rows),
                  static_cast<long long>(out_dim), static_cast<long long>(kIn), simt, split, simt / split);
    }
  }
}

}  // namespace
}  // namespace epic::cuda_kernels

int main(int argc, char** argv) {
  using namespace epic::cuda_kernels;
  uint64_t seed = 1;
  bool quick = false;
  bool checks_only = false;
  std::vector<int64_t> tokens;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (flag == "--quick") {
      quick = true;
    } else if (flag == "--tokens" && i + 1 < argc) {
      // a comma-separated list of token counts, in place of the default sizes
      for (const char* item = argv[++i]; *item != '\0';) {
        char* end = nullptr;
        const long long value = std::strtoll(item, &end, 10);
        if (end == item || value <= 0 || (*end != ',' && *end != '\0')) {
          std::fprintf(stderr, "--tokens: expected positive integers separated by commas, got '%s'\n",
                       argv[i]);
          return 2;
        }
        tokens.push_back(value);
        item = *end == ',' ? end + 1 : end;
      }
    } else if (flag == "--checks-only") {
      checks_only = true;
    } else {
      std::fprintf(stderr, "usage: %s [--seed N] [--quick | --tokens N,N,... | --checks-only]\n", argv[0]);
      return 2;
    }
  }
  try {
    cudaStream_t stream = nullptr;
    EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cublasHandle_t cublas = nullptr;
    EPIC_CUBLAS_CHECK(cublasCreate(&cublas));
    EPIC_CUBLAS_CHECK(cublasSetStream(cublas, stream));
    std::mt19937_64 rng(seed);
    std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
    run_checks(rng, stream, cublas);
    // 256 tokens x top-8 = 2048 rows: a decode step at batch 256.
    std::vector<int64_t> token_counts = {1, 8, 32, 128, 256, 512, 2048, 4096, 16384};
    if (quick) token_counts = {1, 8, 32, 128, 256, 512};
    if (!tokens.empty()) token_counts = tokens;
    if (!checks_only) run_benchmarks(token_counts, seed, stream, cublas);
    if (!checks_only) run_linear_benchmarks(seed, stream, cublas);
    cublasDestroy(cublas);
    cudaStreamDestroy(stream);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
  std::printf("\n%s (%d failed checks)\n", g_failures == 0 ? "PASS" : "FAIL", g_failures);
  return g_failures == 0 ? 0 : 1;
}
