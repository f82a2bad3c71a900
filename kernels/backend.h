// The math of one Qwen3-MoE forward pass, behind one interface so the CPU reference and the
// CUDA backend are interchangeable and testable against each other. All activations are fp32,
// row-major. Pointers are host memory for the CPU backend and device memory for CUDA.
// Every op validates its sizes before touching memory and throws Error(kInvalidArgument) on
// arguments that would read or write out of bounds (negative sizes, top_k > present experts,
// num_heads not a multiple of num_kv_heads, ...); see kernels/backend_checks.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace epic {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // y[rows, out_dim] = x[rows, in_dim] * w[out_dim, in_dim]^T   (nn.Linear without bias)
  virtual void linear(const float* x, const float* w, float* y, int64_t rows, int64_t in_dim,
                      int64_t out_dim) = 0;

  // y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]    (Qwen3RMSNorm, fp32)
  // x and y may alias.
  virtual void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim,
                        float eps) = 0;

  // Rotary embedding in place, rotate-half layout (HF apply_rotary_pos_emb):
  // x[t, h, :] for token t at positions[t]; inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2,
  // angle = positions[t] * inv_freq[i], half = head_dim / 2 (head_dim must be even, theta > 0):
  //   x[i] <- x[i] * cos(angle) - x[i + half] * sin(angle)
  //   x[i + half] <- x[i + half] * cos(angle) + x[i] * sin(angle)
  // The angle, cos and sin are computed in double and rounded to fp32 (HF rounds inv_freq and
  // the angle to fp32 first, which at position ~30000 moves cos/sin by up to ~2e-3; we keep the
  // exact rotation so backends agree to a few ulp at every position).
  virtual void rope(float* x, const int32_t* positions, int64_t num_tokens, int64_t num_heads,
                    int64_t head_dim, double theta) = 0;

  // Causal grouped-query attention for one sequence.
  // q[num_queries, num_heads, head_dim]: the queries at positions first_position .. +num_queries-1.
  // k, v[num_keys, num_kv_heads, head_dim]: every key of the sequence so far (num_keys =
  // first_position + num_queries). Query i attends keys 0 .. first_position + i.
  // Head h uses kv head h / (num_heads / num_kv_heads). Scale is head_dim^-0.5.
  // out[num_queries, num_heads, head_dim].
  virtual void attention(const float* q, const float* k, const float* v, float* out, int64_t num_queries,
                         int64_t num_keys, int64_t first_position, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim) = 0;

  // out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g))
  virtual void silu_mul(const float* gate, const float* up, float* out, int64_t n) = 0;

  // MoE routing for rows of router logits [num_tokens, num_experts]:
  // probabilities = fp32 softmax (max-subtracted) over the experts with present[e] != 0 (others
  // never chosen and not in the denominator), top-k by probability (ties: lower expert id
  // first), renormalised to sum 1 when normalize_top_k. Writes expert_ids[num_tokens, top_k]
  // (descending probability) and weights[num_tokens, top_k]. present[num_experts] lives where
  // the other pointers do. Requires 1 <= top_k <= number of present experts (else throws).
  // The CUDA backend reads present back to the host to check this (a synchronising copy).
  virtual void route_top_k(const float* logits, const uint8_t* present, int32_t* expert_ids, float* weights,
                           int64_t num_tokens, int64_t num_experts, int64_t top_k, bool normalize_top_k) = 0;

  // y[r, :] += scale[r] * x[r, :]
  virtual void scaled_add_rows(const float* x, const float* scale, float* y, int64_t rows, int64_t dim) = 0;

  // y[i] += x[i]
  virtual void add(const float* x, float* y, int64_t n) = 0;
};

// The fp32 CPU reference: clear loops (linear and attention are blocked and multi-threaded for
// speed but sum in a fixed order, so results do not depend on the thread count).
// num_threads <= 0 picks std::thread::hardware_concurrency(), capped at 16.
std::unique_ptr<Backend> make_cpu_backend(int num_threads = 0);

}  // namespace epic
