// A Backend that hands every op to another backend: the base of decorators that change or watch
// one op (the MoE checks: an identity expert FFN, an expert FFN checked against a host reference).
// routed_moe and capture are deliberately NOT forwarded: routed_moe keeps Backend's default, which
// runs the block as the six ops on *this* backend, so a decorator's expert_ffn is the one the MoE
// block uses (a forwarded routed_moe would let the inner backend's fused kernel bypass it); and no
// graphs, because decorators copy to the host inside ops.
#pragma once

#include <memory>
#include <string>

#include "kernels/backend.h"

namespace epic {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(Backend& inner) : inner_(inner) {}

  std::string name() const override { return inner_.name(); }
  MemorySpace memory_space() const override { return inner_.memory_space(); }
  std::unique_ptr<Buffer> allocate(size_t bytes) override { return inner_.allocate(bytes); }
  std::unique_ptr<Buffer> allocate_staging(size_t bytes) override { return inner_.allocate_staging(bytes); }
  void copy_from_host(const Tensor& dst, size_t dst_offset, const void* src, size_t bytes) override {
    inner_.copy_from_host(dst, dst_offset, src, bytes);
  }
  void copy_to_host(const Tensor& src, size_t src_offset, void* dst, size_t bytes) override {
    inner_.copy_to_host(src, src_offset, dst, bytes);
  }
  void copy(const Tensor& src, const Tensor& dst) override { inner_.copy(src, dst); }
  void synchronize() override { inner_.synchronize(); }

  void embed(const Tensor& ids, const Tensor& table, const Tensor& out) override {
    inner_.embed(ids, table, out);
  }
  void linear(const Tensor& x, const Tensor& w, const Tensor& y) override { inner_.linear(x, w, y); }
  void rms_norm(const Tensor& x, const Tensor& weight, const Tensor& y, float eps) override {
    inner_.rms_norm(x, weight, y, eps);
  }
  void add_rms_norm(const Tensor& delta, const Tensor& residual, const Tensor& weight, const Tensor& normed,
                    const Tensor& normed_f32, float eps) override {
    inner_.add_rms_norm(delta, residual, weight, normed, normed_f32, eps);
  }
  void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& positions,
                    const AttentionShape& shape, float eps, double theta) override {
    inner_.qk_norm_rope(qkv, q_norm, k_norm, positions, shape, eps, theta);
  }
  void store_kv(const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool,
                const Tensor& value_pool, const AttentionShape& shape) override {
    inner_.store_kv(qkv, slot_mapping, key_pool, value_pool, shape);
  }
  void attention(const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
                 const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
                 const AttentionShape& shape, const Tensor& out) override {
    inner_.attention(qkv, key_pool, value_pool, block_tables, row_sequence, positions, shape, out);
  }
  void silu_mul(const Tensor& gate_up, const Tensor& out) override { inner_.silu_mul(gate_up, out); }
  void add(const Tensor& x, const Tensor& y) override { inner_.add(x, y); }
  void gather_rows(const Tensor& x, const Tensor& index, const Tensor& out) override {
    inner_.gather_rows(x, index, out);
  }
  void argmax(const Tensor& logits, const Tensor& ids) override { inner_.argmax(logits, ids); }
  void log_softmax(const Tensor& logits, const Tensor& out) override { inner_.log_softmax(logits, out); }
  void score_rows(const Tensor& logits, const Tensor& targets, const Tensor& reference_log_probs,
                  const Tensor& scores, const Tensor& ids) override {
    inner_.score_rows(logits, targets, reference_log_probs, scores, ids);
  }

  void route_top_k(const Tensor& logits, const Tensor& present, const Tensor& expert_ids,
                   const Tensor& weights, bool normalize, const Tensor& row_top_k) override {
    inner_.route_top_k(logits, present, expert_ids, weights, normalize, row_top_k);
  }
  void group_by_expert(const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                       const Tensor& expert_offsets, const Tensor& source_row,
                       const Tensor& sorted_position) override {
    inner_.group_by_expert(expert_ids, num_experts, top_k, expert_offsets, source_row, sorted_position);
  }
  void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                  const Tensor& local_index, const Tensor& intermediate, const Tensor& y) override {
    inner_.expert_ffn(x, expert_offsets, gate_up, down, local_index, intermediate, y);
  }
  void expert_ffn_addressed(const Tensor& x, const Tensor& expert_offsets, const Tensor& addresses,
                            ScalarType weight_type, const Tensor& intermediate, const Tensor& y) override {
    inner_.expert_ffn_addressed(x, expert_offsets, addresses, weight_type, intermediate, y);
  }
  void count_routed_slots(const Tensor& expert_ids, const Tensor& real_tokens, const Tensor& expert_counts,
                          const Tensor& keys, const Tensor& key_counts) override {
    inner_.count_routed_slots(expert_ids, real_tokens, expert_counts, keys, key_counts);
  }
  void combine_top_k(const Tensor& expert_out, const Tensor& sorted_position, const Tensor& weights,
                     const Tensor& out) override {
    inner_.combine_top_k(expert_out, sorted_position, weights, out);
  }
  void copy_from_host_scattered(const std::vector<HostCopy>& copies) override {
    inner_.copy_from_host_scattered(copies);
  }
  void enqueue_side_copies(const std::vector<HostCopy>& copies) override {
    inner_.enqueue_side_copies(copies);
  }
  void wait_side_copies() override { inner_.wait_side_copies(); }

 protected:
  Backend& inner() { return inner_; }

 private:
  Backend& inner_;
};

// The loader writes into host memory without the backend (memory_space kHost) and through staging
// buffers with it; the expert store's lower tiers are host memory of any backend (pinned for cuda), so
// they are filled through this view of the backend that says "host". Only memory_space differs.
class HostMemoryView final : public ForwardingBackend {
 public:
  explicit HostMemoryView(Backend& inner) : ForwardingBackend(inner) {}
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
};

}  // namespace epic
