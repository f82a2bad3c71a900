// The fp32 CPU reference backend: host memory, ops computed at once (synchronize is a no-op, no
// graphs), every sum in a fixed order that does not depend on the thread count, so it is the
// yardstick the other backends are tested against. The op bodies live in cpu_dense_ops.cpp,
// cpu_moe_ops.cpp and cpu_dot_kernels.cpp; this file owns memory, validation and dispatch.
#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>

#include "kernels/backend.h"
#include "kernels/backend_checks.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/error.h"

namespace epic {
namespace {

constexpr int kMaxThreads = 16;
constexpr MemorySpace kSpace = MemorySpace::kHost;
// Cache-line aligned, and enough for any SIMD load.
constexpr size_t kAlignment = 64;

// Aligned host memory, left uninitialised: the pages of a large weight buffer are first touched
// when the weights are copied in, so they are written once, not zeroed and then written.
class HostBuffer final : public Buffer {
 public:
  HostBuffer(void* data, size_t size) : Buffer(data, size, MemorySpace::kHost) {}
  ~HostBuffer() override { ::operator delete(data(), std::align_val_t(kAlignment)); }
};

std::unique_ptr<Buffer> allocate_host(size_t bytes) {
  void* data = ::operator new(std::max<size_t>(bytes, 1), std::align_val_t(kAlignment), std::nothrow);
  if (data == nullptr) {
    throw Error(ErrorCode::kUnsupported, "cpu backend: cannot allocate " + std::to_string(bytes) +
                                             " bytes of host memory; lower the batch or the model size");
  }
  return std::make_unique<HostBuffer>(data, bytes);
}

// The CPU backend is the fp32 reference: bf16 activations are the CUDA serving mode's.
void require_f32(const char* op, const char* name, const Tensor& t) {
  if (t.type != ScalarType::kF32) {
    throw Error(ErrorCode::kUnsupported,
                std::string(op) + ": " + name + " is " + t.describe() +
                    "; the CPU backend is the fp32 reference and takes f32 activations "
                    "only (bf16 activations are the CUDA backend's serving mode)");
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : num_threads_(num_threads) {}

  std::string name() const override { return "cpu(" + std::to_string(num_threads_) + " threads)"; }
  MemorySpace memory_space() const override { return kSpace; }

  // ---- memory ----
  std::unique_ptr<Buffer> allocate(size_t bytes) override { return allocate_host(bytes); }
  std::unique_ptr<Buffer> allocate_staging(size_t bytes) override { return allocate_host(bytes); }

  void copy_from_host(const Tensor& dst, size_t dst_offset, const void* src, size_t bytes) override {
    backend_checks::check_copy_range("copy_from_host", kSpace, dst, dst_offset, bytes);
    if (bytes > 0) std::memcpy(static_cast<char*>(dst.data) + dst_offset, src, bytes);
  }
  void copy_to_host(const Tensor& src, size_t src_offset, void* dst, size_t bytes) override {
    backend_checks::check_copy_range("copy_to_host", kSpace, src, src_offset, bytes);
    if (bytes > 0) std::memcpy(dst, static_cast<const char*>(src.data) + src_offset, bytes);
  }
  void copy(const Tensor& src, const Tensor& dst) override {
    backend_checks::check_copy("copy", kSpace, src, dst);
    if (src.bytes() > 0 && src.data != dst.data) std::memmove(dst.data, src.data, src.bytes());
  }
  void synchronize() override {}

  // ---- dense ops ----
  void embed(const Tensor& ids, const Tensor& table, const Tensor& out) override {
    backend_checks::check_embed(kSpace, ids, table, out);
    require_f32("embed", "out", out);
    cpu::embed(ids, table, out);
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor& y) override {
    backend_checks::check_linear(kSpace, x, w, y);
    require_f32("linear", "x", x);
    require_f32("linear", "y", y);
    cpu::linear(x.as<const float>(), w.data, w.type, y.as<float>(), x.dim(0), x.dim(1), w.dim(0),
                num_threads_);
  }

  void rms_norm(const Tensor& x, const Tensor& weight, const Tensor& y, float eps) override {
    backend_checks::check_rms_norm(kSpace, x, weight, y);
    require_f32("rms_norm", "x", x);
    require_f32("rms_norm", "y", y);
    cpu::rms_norm(x, weight, y, eps);
  }

  void add_rms_norm(const Tensor& delta, const Tensor& residual, const Tensor& weight, const Tensor& normed,
                    const Tensor& normed_f32, float eps) override {
    backend_checks::check_add_rms_norm(kSpace, delta, residual, weight, normed, normed_f32);
    require_f32("add_rms_norm", "delta", delta);
    require_f32("add_rms_norm", "normed", normed);
    cpu::add_rms_norm(delta, residual, weight, normed, normed_f32, eps);
  }

  void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& positions,
                    const AttentionShape& shape, float eps, double theta) override {
    backend_checks::check_qk_norm_rope(kSpace, qkv, q_norm, k_norm, positions, shape, theta);
    require_f32("qk_norm_rope", "qkv", qkv);
    cpu::qk_norm_rope(qkv, q_norm, k_norm, positions, shape, eps, theta);
  }

  void store_kv(const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool,
                const Tensor& value_pool, const AttentionShape& shape) override {
    backend_checks::check_store_kv(kSpace, qkv, slot_mapping, key_pool, value_pool, shape);
    require_f32("store_kv", "qkv", qkv);
    cpu::store_kv(qkv, slot_mapping, key_pool, value_pool, shape);
  }

  void attention(const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
                 const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
                 const AttentionShape& shape, const Tensor& out) override {
    backend_checks::check_attention(kSpace, qkv, key_pool, value_pool, block_tables, row_sequence, positions,
                                    shape, out);
    require_f32("attention", "qkv", qkv);
    cpu::attention(qkv, key_pool, value_pool, block_tables, row_sequence, positions, shape, out,
                   num_threads_);
  }

  void silu_mul(const Tensor& gate_up, const Tensor& out) override {
    backend_checks::check_silu_mul(kSpace, gate_up, out);
    require_f32("silu_mul", "gate_up", gate_up);
    cpu::silu_mul(gate_up, out);
  }

  void add(const Tensor& x, const Tensor& y) override {
    backend_checks::check_add(kSpace, x, y);
    require_f32("add", "x", x);
    require_f32("add", "y", y);
    cpu::add(x, y);
  }

  void gather_rows(const Tensor& x, const Tensor& index, const Tensor& out) override {
    backend_checks::check_gather_rows(kSpace, x, index, out);
    cpu::gather_rows(x, index, out);
  }

  void argmax(const Tensor& logits, const Tensor& ids) override {
    backend_checks::check_argmax(kSpace, logits, ids);
    require_f32("argmax", "logits", logits);
    cpu::argmax(logits, ids);
  }

  // ---- scoring ----
  void log_softmax(const Tensor& logits, const Tensor& out) override {
    backend_checks::check_log_softmax(kSpace, logits, out);
    cpu::log_softmax(logits, out, num_threads_);
  }

  void score_rows(const Tensor& logits, const Tensor& targets, const Tensor& reference_log_probs,
                  const Tensor& scores, const Tensor& ids) override {
    backend_checks::check_score_rows(kSpace, logits, targets, reference_log_probs, scores, ids);
    cpu::score_rows(logits, targets, reference_log_probs, scores, ids, num_threads_);
  }

  // ---- MoE ops ----
  void route_top_k(const Tensor& logits, const Tensor& present, const Tensor& expert_ids,
                   const Tensor& weights, bool normalize, const Tensor& row_top_k) override {
    backend_checks::check_route_top_k(kSpace, logits, present, expert_ids, weights, row_top_k);
    require_f32("route_top_k", "logits", logits);
    cpu::route_top_k(logits, present, expert_ids, weights, normalize, row_top_k);
  }

  void group_by_expert(const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                       const Tensor& expert_offsets, const Tensor& source_row,
                       const Tensor& sorted_position) override {
    backend_checks::check_group_by_expert(kSpace, expert_ids, num_experts, top_k, expert_offsets, source_row,
                                          sorted_position);
    cpu::group_by_expert(expert_ids, num_experts, top_k, expert_offsets, source_row, sorted_position);
  }

  void count_routed_slots(const Tensor& expert_ids, const Tensor& real_tokens, const Tensor& expert_counts,
                          const Tensor& keys, const Tensor& key_counts) override {
    backend_checks::check_count_routed_slots(kSpace, expert_ids, real_tokens, expert_counts, keys,
                                             key_counts);
    cpu::count_routed_slots(expert_ids, real_tokens, expert_counts, keys, key_counts);
  }

  void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                  const Tensor& local_index, const Tensor& intermediate, const Tensor& y) override {
    backend_checks::check_expert_ffn(kSpace, x, expert_offsets, gate_up, down, local_index, intermediate, y);
    require_f32("expert_ffn", "x", x);
    cpu::expert_ffn(x, expert_offsets, gate_up, down, local_index, intermediate, y, num_threads_);
  }

  void expert_ffn_addressed(const Tensor& x, const Tensor& expert_offsets, const Tensor& addresses,
                            ScalarType weight_type, const Tensor& intermediate, const Tensor& y) override {
    backend_checks::check_expert_ffn_addressed(kSpace, x, expert_offsets, addresses, weight_type,
                                               intermediate, y);
    require_f32("expert_ffn_addressed", "x", x);
    cpu::expert_ffn_addressed(x, expert_offsets, addresses, weight_type, intermediate, y, num_threads_);
  }

  void combine_top_k(const Tensor& expert_out, const Tensor& sorted_position, const Tensor& weights,
                     const Tensor& out) override {
    backend_checks::check_combine_top_k(kSpace, expert_out, sorted_position, weights, out);
    require_f32("combine_top_k", "expert_out", expert_out);
    cpu::combine_top_k(expert_out, sorted_position, weights, out);
  }

 private:
  int num_threads_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) {
  if (num_threads <= 0) {
    const unsigned hardware_threads = std::thread::hardware_concurrency();
    num_threads = std::clamp(static_cast<int>(hardware_threads), 1, kMaxThreads);
  }
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace epic
