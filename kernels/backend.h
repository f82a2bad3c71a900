// The math of one Qwen3-MoE forward pass behind one interface, over tensors the backend owns.
// A backend allocates its memory (Buffer), moves bytes between it and the host, and runs ops on
// its own stream: the CPU backend computes at once on host memory (the fp32 reference); the CUDA
// backend enqueues kernels on one GPU and never touches host memory inside an op, so a whole step
// runs without host synchronisation and can be captured as a graph.
//
// Types: activations are F32 or BF16 ("act" below; the ops of one model use one activation type,
// with fp32 accumulation everywhere); weights F32 or BF16, as the checkpoint stores them; routing
// weights F32; ids, positions and tables I32; masks U8. Every op validates its tensors' types,
// shapes and memory space before touching memory and throws Error(kInvalidArgument) naming the op
// and the offending tensor (kernels/backend_checks.h), or Error(kUnsupported) for a type
// combination the backend does not implement.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>

#include "kernels/tensor.h"

namespace epic {

// A recorded sequence of ops replayed as one unit (a CUDA graph).
class Graph {
 public:
  virtual ~Graph() = default;
  virtual void replay() = 0;  // enqueues the recorded ops on the backend's stream
};

// The attention geometry of a model, shared by the ops that read q, k and v out of the fused
// projection output qkv[rows, (num_heads + 2 * num_kv_heads) * head_dim] (q heads, then k, then v).
struct AttentionShape {
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  int64_t qkv_dim() const { return q_dim() + 2 * kv_dim(); }
};

// Keys and values live in fixed-size blocks of a pool (the paged KV cache): one pool tensor per
// layer and kind, [num_blocks, kKvBlockSize, num_kv_heads, head_dim] of the activation type. A
// sequence's block table lists the blocks holding its positions 0.., kKvBlockSize at a time.
constexpr int64_t kKvBlockSize = 16;

// An optional tensor argument left out: a default Tensor{} (rank 0, no data). Any other tensor given
// for an optional argument is checked and used like a required one.
inline bool is_absent(const Tensor& t) { return t.rank == 0 && t.data == nullptr; }

// One MoE layer's routing and expert weights for Backend::routed_moe (shapes as in the ops it is
// made of): router [E, H] (any weight type), present U8 [E], gate_up [L, 2I, H], down [L, H, I],
// local_index I32 [E]; normalize: renormalise the top-k weights (config norm_topk_prob).
// With `addresses` (I64 [E, 2], an expert store's table: Backend::expert_ffn_addressed) each expert's
// weights are at their own address, of addressed_weight_type, and gate_up, down and local_index are
// not used.
struct RoutedMoeWeights {
  Tensor router, present, gate_up, down, local_index;
  bool normalize = true;
  Tensor addresses;
  ScalarType addressed_weight_type = ScalarType::kBF16;
  Tensor row_top_k;  // optional: each token's own experts per token (Backend::route_top_k)
};

// Whether slot j of a token's routing (ids: its top_k expert ids) is route_top_k's padding past the
// token's own k: a repeat of its first choice, which a real choice never is (the k choices are
// distinct experts). Statistics of what was routed skip these slots.
inline bool is_padding_slot(const int32_t* token_expert_ids, int64_t j) {
  return j > 0 && token_expert_ids[j] == token_expert_ids[0];
}
// The token's own k: its slots before the first padding one (top_k when it has none).
inline int64_t own_top_k(const int32_t* token_expert_ids, int64_t top_k) {
  int64_t k = 1;
  while (k < top_k && !is_padding_slot(token_expert_ids, k)) ++k;
  return k;
}

// One copy of Backend::copy_from_host_scattered / enqueue_side_copies: dst bytes [dst_offset, dst_offset +
// bytes) <- host src.
struct HostCopy {
  Tensor dst;
  size_t dst_offset = 0;
  const void* src = nullptr;
  size_t bytes = 0;
};

// A step's per-row tables for Backend::decode_attention (I32, on the backend): positions, slot_mapping
// and row_sequence [rows]; block_tables [sequences, max_blocks] (see attention and store_kv).
struct AttentionTables {
  Tensor positions, slot_mapping, row_sequence, block_tables;
};

// Backend::routed_moe's scratch, T tokens with top_k choices each (S = T * top_k slots): logits F32
// [T, E]; expert_ids I32 [T, top_k] and weights F32 [T, top_k] (the routing, an output too);
// expert_offsets I32 [E + 1]; source_row and sorted_position I32 [S]; sorted_rows and expert_out
// [S, H] and intermediate [S, I] of the activation type.
struct RoutedMoeScratch {
  Tensor logits, expert_ids, weights, expert_offsets, source_row, sorted_position, sorted_rows, intermediate,
      expert_out;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual MemorySpace memory_space() const = 0;  // where allocate() puts memory

  // ---- Memory -------------------------------------------------------------------------------
  // Uninitialised memory of this backend. Throws Error(kUnsupported) when the memory is not
  // there (naming the size asked and what is free).
  virtual std::unique_ptr<Buffer> allocate(size_t bytes) = 0;
  // Host memory that copies to and from this backend can use asynchronously (pinned for cuda).
  virtual std::unique_ptr<Buffer> allocate_staging(size_t bytes) = 0;
  OwnedTensor new_tensor(ScalarType type, std::initializer_list<int64_t> shape);
  // dst (this backend's memory) bytes [dst_offset, dst_offset + bytes) <- host src. Asynchronous
  // where the backend is: src must stay valid and unchanged until synchronize() returns.
  virtual void copy_from_host(const Tensor& dst, size_t dst_offset, const void* src, size_t bytes) = 0;
  // host dst <- src bytes [src_offset, src_offset + bytes); returns when dst holds them (it waits
  // for the ops enqueued before).
  virtual void copy_to_host(const Tensor& src, size_t src_offset, void* dst, size_t bytes) = 0;
  // dst <- src, both this backend's memory, same byte count.
  virtual void copy(const Tensor& src, const Tensor& dst) = 0;
  // Waits until every op and copy enqueued so far has finished.
  virtual void synchronize() = 0;
  // copy_from_host for many (small) copies at once, on the stream: after the ops enqueued before, before
  // those enqueued after, in no order among themselves (they must not overlap). The srcs as
  // copy_from_host's, and on cuda pinned (allocate_staging): small copies run as one kernel that reads
  // them in place. Default: copy_from_host each.
  virtual void copy_from_host_scattered(const std::vector<HostCopy>& copies);
  // Copies on a second queue, after the ops enqueued so far and beside the ones enqueued later (cuda: a
  // copy stream that waits for an event recorded now), so a copy into memory that no later op reads
  // until told can overlap the next steps' compute. The copies of one call run in no particular order
  // (or at once: they must not overlap); calls run one after another. The srcs must stay valid and
  // unchanged until wait_side_copies() returns (pinned staging memory on cuda). Default: copy_from_host
  // on the stream, in order (nothing overlaps).
  virtual void enqueue_side_copies(const std::vector<HostCopy>& copies);
  // Returns when every side copy enqueued so far has finished (the host waits; later ops do not).
  virtual void wait_side_copies() {}

  // ---- Graphs -------------------------------------------------------------------------------
  // Records the ops `record` enqueues (without running them) for replay; nullptr when the backend
  // has no graphs (the caller then runs the ops directly). The ops must not synchronise or copy
  // to the host; the tensors they use must outlive the graph.
  virtual std::unique_ptr<Graph> capture(const std::function<void()>& /*record*/) { return nullptr; }

  // ---- Dense ops ----------------------------------------------------------------------------
  // out[r, :] = table[ids[r], :]; ids I32 [rows] within [0, vocab) (checked by the caller).
  virtual void embed(const Tensor& ids, const Tensor& table, const Tensor& out) = 0;

  // y[rows, out_dim] = x[rows, in_dim] * w[out_dim, in_dim]^T (nn.Linear without bias), fp32
  // accumulation; y may be F32 when x is BF16 (router and lm_head logits).
  virtual void linear(const Tensor& x, const Tensor& w, const Tensor& y) = 0;

  // y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:] (Qwen3RMSNorm, in fp32).
  // x [rows, dim], weight [dim], y [rows, dim]; x and y may alias; types may differ.
  virtual void rms_norm(const Tensor& x, const Tensor& weight, const Tensor& y, float eps) = 0;

  // The residual add fused with the norm after it (vLLM's fused_add_rms_norm), one pass per row:
  //   residual += delta (fp32, as add);  normed = rms_norm(residual) * weight (as rms_norm),
  // and, unless normed_f32 is absent (is_absent: Tensor{}), the same normalised rows again in f32
  // (the router's input in bf16 mode). The same arithmetic as add(delta, residual) followed by
  // rms_norm(residual, weight, normed) (and into normed_f32): bitwise on the CPU, up to fp32 sum
  // order on other backends. delta [rows, dim] F32 or act; residual F32 [rows, dim] (the residual
  // stream); weight [dim]; normed [rows, dim] act; normed_f32 F32 [rows, dim]. No two of delta,
  // residual, normed and normed_f32 may overlap.
  virtual void add_rms_norm(const Tensor& delta, const Tensor& residual, const Tensor& weight,
                            const Tensor& normed, const Tensor& normed_f32, float eps) = 0;

  // In place on the fused projection output qkv[rows, shape.qkv_dim()]: each q and k head vector
  // is RMS-normed with q_norm / k_norm [head_dim] and then rotated by its row's position (rotary
  // embedding, rotate-half layout as HF apply_rotary_pos_emb; angle = position * theta^(-2i/d),
  // computed in double and rounded to fp32). positions I32 [rows]. v is untouched.
  virtual void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                            const Tensor& positions, const AttentionShape& shape, float eps,
                            double theta) = 0;

  // Writes each row's k and v (from qkv) to the pools at slot_mapping[r] (block * kKvBlockSize +
  // offset); rows with slot_mapping[r] < 0 (padding) are skipped.
  virtual void store_kv(const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool,
                        const Tensor& value_pool, const AttentionShape& shape) = 0;

  // Causal grouped-query attention of every row over its own sequence's cached keys: row r is
  // position positions[r] of sequence row_sequence[r] and attends that sequence's positions
  // 0 .. positions[r] (already stored), found through block_tables I32 [num_sequences,
  // max_blocks]. q is read from qkv; out [rows, shape.q_dim()]. Head h uses kv head
  // h / (num_heads / num_kv_heads); scale head_dim^-0.5; softmax in fp32.
  virtual void attention(const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
                         const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
                         const AttentionShape& shape, const Tensor& out) = 0;

  // The attention of a decode step as one op: qk_norm_rope(qkv, q_norm, k_norm, positions, ...), then
  // store_kv(qkv, slot_mapping, ...), then attention(...) into out. Precondition (what makes it a decode
  // step): a row with a slot is the only row of its sequence in the call and its newest position, so no
  // row reads a key that another row of the call writes. This default runs exactly those three ops. A
  // backend may fuse them (CUDA does for a few rows and short block tables: attention_decode_fused.cu)
  // with the same keys and values stored and the same roundings up to the order of fp32 sums; qkv's q
  // and k heads are then left unspecified. Errors name decode_attention and the failing step.
  virtual void decode_attention(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                                const Tensor& key_pool, const Tensor& value_pool,
                                const AttentionTables& tables, const AttentionShape& shape, float eps,
                                double theta, const Tensor& out);

  // out[r, i] = silu(gate_up[r, i]) * gate_up[r, I + i] for gate_up [rows, 2I], out [rows, I].
  virtual void silu_mul(const Tensor& gate_up, const Tensor& out) = 0;

  // y += x elementwise (same shape; types may differ; fp32 add, rounded to y's type).
  virtual void add(const Tensor& x, const Tensor& y) = 0;

  // out[i, :] = x[index[i], :]; index I32 [m] within [0, x.rows()).
  virtual void gather_rows(const Tensor& x, const Tensor& index, const Tensor& out) = 0;

  // ids[r] = the lowest id among the largest logits[r, :]; logits [rows, vocab] F32 or BF16.
  // A row holding a NaN or an infinity gets ids[r] = -1 (no choice is meaningful; the caller
  // reports it), so greedy decoding needs no logits on the host to stay checked.
  virtual void argmax(const Tensor& logits, const Tensor& ids) = 0;

  // ---- Scoring (epic eval) ------------------------------------------------------------------
  // The figures of next-token scoring, computed where the logits are so that only a few numbers per
  // row reach the host. The arithmetic is kernels/next_token_scores.h's: fp32 terms, double sums (the
  // CPU backend runs those functions; CUDA sums in another order and its expf may differ by an ulp, so
  // its figures agree to ~1e-7 relative, not bitwise). Non-finite logits give non-finite figures, not
  // an error (the caller reports them); the argmax of such a row is unspecified. The columns of
  // score_rows' scores [rows, kNumRowScores] are RowScoreColumn (below the class).

  // out[r, v] = logits[r, v] - log_sum_exp(logits[r, :]) (log_softmax_row): logits and out F32
  // [rows, vocab], not overlapping.
  virtual void log_softmax(const Tensor& logits, const Tensor& out) = 0;

  // Row r's figures for the next token targets[r] (I32 [rows], within [0, vocab): the CPU throws
  // otherwise, CUDA writes a NaN target logit) given logits F32 [rows, vocab], against
  // reference_log_probs F32 [rows, vocab] (log_softmax of the reference run's logits at the same
  // positions): scores F32 [rows, kNumRowScores] (RowScoreColumn: log-sum-exp, the target's logit,
  // KL(reference || logits), as score_row) and ids I32 [rows] (the argmax, lowest id among the largest).
  // The outputs overlap no input.
  virtual void score_rows(const Tensor& logits, const Tensor& targets, const Tensor& reference_log_probs,
                          const Tensor& scores, const Tensor& ids) = 0;

  // ---- MoE ops ------------------------------------------------------------------------------
  // Router: probabilities = fp32 softmax (max-subtracted) of logits [tokens, E] over the experts
  // with present[e] != 0 (U8 [E]; others are never chosen and not in the denominator), top-k by
  // probability (ties: lower expert id first), renormalised to sum 1 when normalize. Writes
  // expert_ids I32 [tokens, k] in descending probability and weights F32 [tokens, k]. The caller
  // guarantees 1 <= k <= the number of present experts (checked once at load).
  // With row_top_k (I32 [tokens], each in [1, k]: a residency state per request) token t takes
  // k_t = row_top_k[t] experts: its slots j < k_t are exactly what k = k_t would write (the first k_t
  // choices are the same; the renormalisation sums only them), and its slots j >= k_t are padding: the
  // token's first choice again with weight 0, so every later op runs unchanged and the combine adds an
  // exact zero (is_padding_slot tells them apart). The values are the caller's to keep in range.
  virtual void route_top_k(const Tensor& logits, const Tensor& present, const Tensor& expert_ids,
                           const Tensor& weights, bool normalize, const Tensor& row_top_k = Tensor{}) = 0;

  // The permutation that groups (token, slot) rows by expert: sorts the slots s = t * k + j of
  // expert_ids I32 [slots] by expert, stable (slot order within an expert). Writes
  // expert_offsets I32 [num_experts + 1] (expert e's rows are [offsets[e], offsets[e + 1])),
  // source_row I32 [slots] (the token, s / top_k, of each sorted row) and sorted_position I32
  // [slots] (where slot s went). Deterministic.
  virtual void group_by_expert(const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                               const Tensor& expert_offsets, const Tensor& source_row,
                               const Tensor& sorted_position) = 0;

  // Tallies routed slots for statistics (the per-expert load /metrics reports): for each token
  // t < real_tokens and each slot j of it that is not padding (is_padding_slot),
  // expert_counts[expert_ids[t, j]] += 1 and, with keys, key_counts[keys[t, j]] += 1 (e.g. the rank the
  // slot is sent to). real_tokens: I32 [1] on the backend, the step's tokens before a graph bucket's
  // padding rows (absent: every token of expert_ids; a value past the tokens counts them all). Ids and
  // keys outside [0, their counts' length) are skipped. expert_ids and keys I32 [tokens, top_k]; the
  // counts I64, added to (integer adds, exact in any order). Only enqueued (capturable): read the counts
  // after synchronize().
  virtual void count_routed_slots(const Tensor& expert_ids, const Tensor& real_tokens,
                                  const Tensor& expert_counts, const Tensor& keys,
                                  const Tensor& key_counts) = 0;

  // The SwiGLU FFN of every hosted expert over its group of rows, all experts in one call:
  // for rows r in [offsets[e], offsets[e + 1]): y[r] = down_e(silu(gate_e x[r]) * up_e x[r]).
  // x, y [rows, H]; expert_offsets I32 [E + 1] with offsets[E] == rows (CUDA also takes offsets[E] <
  // rows, an upper-bound shape: rows from offsets[E] on are not computed, their y unspecified);
  // gate_up [L, 2I, H] (gate rows first, as transformers' fused experts) and down [L, H, I] hold the L hosted
  // experts; local_index I32 [E] maps an expert to its slot in them, -1 when not hosted (such an expert must
  // have no rows). intermediate [rows, I] (activation type) is the caller's scratch for silu(gate x) * up x.
  // Each row is computed alone, so its result does not depend on the others.
  virtual void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up,
                          const Tensor& down, const Tensor& local_index, const Tensor& intermediate,
                          const Tensor& y) = 0;

  // expert_ffn with each expert's weights at its own address instead of one stack: addresses I64 [E, 2]
  // (this backend's memory) holds expert e's gate_up [2I, H] and down [H, I] addresses in weight_type,
  // or 0 for an expert that is not hosted (which must have no rows); I is intermediate's width. An
  // address may be this backend's memory or host memory its kernels can read: on cuda, pinned staging
  // memory (allocate_staging) at its host address (unified addressing), read over the bus as the kernel
  // runs. So an expert store serves an expert that is not resident in place, and moves one between
  // tiers by rewriting its two addresses, with no host synchronisation in the step. The same
  // arithmetic as expert_ffn over the same weights (bitwise equal on both backends). Default:
  // Error(kUnsupported).
  virtual void expert_ffn_addressed(const Tensor& x, const Tensor& expert_offsets, const Tensor& addresses,
                                    ScalarType weight_type, const Tensor& intermediate, const Tensor& y);

  // out[t, :] = sum over j = 0 .. k-1, in that order and in fp32, of
  //   weights[t, j] * expert_out[sorted_position[t * k + j], :]
  // weights F32 [tokens, k], expert_out [slots, H], out [tokens, H] (overwritten; F32, or the type of
  // expert_out).
  virtual void combine_top_k(const Tensor& expert_out, const Tensor& sorted_position, const Tensor& weights,
                             const Tensor& out) = 0;

  // ---- The routed MoE block as one op -------------------------------------------------------
  // The ops above in the order a MoE layer runs them, on the caller's scratch:
  //   linear(router_input, router, logits); route_top_k(logits, present, expert_ids, weights);
  //   group_by_expert; gather_rows(x, source_row, sorted_rows);
  //   expert_ffn(sorted_rows, ..., intermediate, expert_out); combine_top_k(expert_out, ..., out).
  // This default runs exactly those ops. A backend may instead fuse the block where that is faster
  // (CUDA does for a few bf16 tokens: routed_moe_fused.cu), with the same routing (expert_ids and
  // weights, written either way) and the same roundings, up to the order of fp32 sums; the rest of
  // the scratch is then left unspecified. Errors name routed_moe and the step whose tensors are wrong.
  virtual void routed_moe(const Tensor& router_input, const Tensor& x, const RoutedMoeWeights& weights,
                          const RoutedMoeScratch& scratch, const Tensor& out);

 protected:
  // The defaults of the composite ops without their own up-front check (each op still checks its
  // tensors): for an override that has checked already and falls back to the ops.
  void run_decode_attention_ops(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                                const Tensor& key_pool, const Tensor& value_pool,
                                const AttentionTables& tables, const AttentionShape& shape, float eps,
                                double theta, const Tensor& out);
  void run_routed_moe_ops(const Tensor& router_input, const Tensor& x, const RoutedMoeWeights& weights,
                          const RoutedMoeScratch& scratch, const Tensor& out);
};

// The columns of Backend::score_rows' scores (F32). The caller forms a row's negative log-likelihood
// as double(log-sum-exp) - double(target logit), as add_token_quality does.
enum RowScoreColumn : int64_t {
  kRowLogSumExp = 0,     // log(sum_v exp(logits[v])), rounded to fp32 as the figures use it
  kRowTargetLogit = 1,   // logits[target], exactly
  kRowKlDivergence = 2,  // KL(reference || these logits) in nats, >= 0
  kNumRowScores = 3,
};

// The fp32 CPU reference: clear loops (linear and attention are blocked and multi-threaded for
// speed but sum in a fixed order, so results do not depend on the thread count). Takes F32
// activations; BF16 weights are widened block by block (exactly), so results are those of an fp32
// copy of the weights. num_threads <= 0 picks std::thread::hardware_concurrency(), capped at 16.
std::unique_ptr<Backend> make_cpu_backend(int num_threads = 0);

}  // namespace epic
