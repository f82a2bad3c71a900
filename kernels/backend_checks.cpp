// Argument checks shared by every Backend (see backend_checks.h).
#include "kernels/backend_checks.h"

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/error.h"

namespace epic::backend_checks {
namespace {

// The scalar types a tensor may have in its role.
enum class Types {
  kActivation,  // F32 or BF16 (one per model)
  kWeight,      // F32 or BF16 (as the checkpoint stores it)
  kF32,
  kI32,
  kU8,
  kI64,
  kAny,
};

const char* types_text(Types types) {
  switch (types) {
    case Types::kActivation:
      return "f32 or bf16 (an activation)";
    case Types::kWeight:
      return "f32 or bf16 (a weight)";
    case Types::kF32:
      return "f32";
    case Types::kI32:
      return "i32";
    case Types::kU8:
      return "u8";
    case Types::kI64:
      return "i64";
    case Types::kAny:
      return "any type";
  }
  return "?";
}

bool has_type(const Tensor& t, Types types) {
  switch (types) {
    case Types::kActivation:
    case Types::kWeight:
      return t.type == ScalarType::kF32 || t.type == ScalarType::kBF16;
    case Types::kF32:
      return t.type == ScalarType::kF32;
    case Types::kI32:
      return t.type == ScalarType::kI32;
    case Types::kU8:
      return t.type == ScalarType::kU8;
    case Types::kI64:
      return t.type == ScalarType::kI64;
    case Types::kAny:
      return true;
  }
  return false;
}

const char* space_name(MemorySpace space) { return space == MemorySpace::kDevice ? "device" : "host"; }

// The checks of one op call: every failure names the op and the tensors involved.
class OpCheck {
 public:
  OpCheck(const char* op, MemorySpace space) : op_(op), space_(space) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(ErrorCode::kInvalidArgument, std::string(op_) + ": " + what);
  }

  // t lives in this backend's memory, has memory behind it when non-empty, the given rank
  // (layout spells the dimensions out for the message) and a type of the set.
  void tensor(const char* name, const Tensor& t, int rank, const char* layout, Types types) const {
    const std::string prefix = std::string(name) + " is " + t.describe();
    if (t.space != space_) {
      fail(prefix + " but this backend's memory is on " + space_name(space_) +
           "; allocate it through the backend (Backend::new_tensor) or copy it there first");
    }
    if (t.data == nullptr && t.numel() > 0) fail(prefix + " with no memory behind it (data is null)");
    if (t.rank != rank) fail(prefix + "; it must have rank " + std::to_string(rank) + ": " + layout);
    if (!has_type(t, types)) fail(prefix + "; it must be " + types_text(types));
  }

  // "w is bf16[64, 32] on host but x is f32[4, 48] on host: in_dim differs"
  [[noreturn]] void fail_pair(const char* a_name, const Tensor& a, const char* b_name, const Tensor& b,
                              const std::string& what) const {
    fail(std::string(a_name) + " is " + a.describe() + " but " + b_name + " is " + b.describe() + ": " +
         what);
  }

  void same_dim(const char* a_name, const Tensor& a, int a_dim, const char* b_name, const Tensor& b,
                int b_dim, const char* what) const {
    if (a.dim(a_dim) != b.dim(b_dim)) fail_pair(a_name, a, b_name, b, std::string(what) + " differs");
  }

  void dim_is(const char* name, const Tensor& t, int dim, int64_t expected, const std::string& what) const {
    if (t.dim(dim) != expected) {
      fail(std::string(name) + " is " + t.describe() + ": dimension " + std::to_string(dim) + " must be " +
           std::to_string(expected) + " (" + what + ")");
    }
  }

  void same_type(const char* a_name, const Tensor& a, const char* b_name, const Tensor& b,
                 const char* why) const {
    if (a.type != b.type) fail_pair(a_name, a, b_name, b, std::string("the types differ (") + why + ")");
  }

  void same_shape(const char* a_name, const Tensor& a, const char* b_name, const Tensor& b) const {
    bool same = a.rank == b.rank;
    for (int i = 0; same && i < a.rank; ++i) same = a.dim(i) == b.dim(i);
    if (!same) fail_pair(a_name, a, b_name, b, "the shapes differ");
  }

  // a and b share no byte (an op that writes one while reading the other would race).
  void disjoint(const char* a_name, const Tensor& a, const char* b_name, const Tensor& b) const {
    if (a.bytes() == 0 || b.bytes() == 0) return;
    const auto a_begin = reinterpret_cast<uintptr_t>(a.data), b_begin = reinterpret_cast<uintptr_t>(b.data);
    if (a_begin < b_begin + b.bytes() && b_begin < a_begin + a.bytes()) {
      fail_pair(a_name, a, b_name, b, "their memory overlaps; give each its own buffer");
    }
  }

  void attention_shape(const AttentionShape& shape) const {
    const std::string text = "attention shape (num_heads " + std::to_string(shape.num_heads) +
                             ", num_kv_heads " + std::to_string(shape.num_kv_heads) + ", head_dim " +
                             std::to_string(shape.head_dim) + ")";
    if (shape.num_heads < 1 || shape.num_kv_heads < 1 || shape.head_dim < 1) {
      fail(text + ": every count must be >= 1");
    }
    if (shape.num_heads % shape.num_kv_heads != 0) {
      fail(text + ": num_heads = " + std::to_string(shape.num_heads) +
           " is not a multiple of num_kv_heads = " + std::to_string(shape.num_kv_heads) +
           "; each kv head must serve a whole group of query heads");
    }
  }

  // Fused q/k/v rows of the attention geometry.
  void qkv(const Tensor& qkv, const AttentionShape& shape) const {
    tensor("qkv", qkv, 2, "[rows, (num_heads + 2 * num_kv_heads) * head_dim]", Types::kActivation);
    dim_is("qkv", qkv, 1, shape.qkv_dim(),
           "(num_heads + 2 * num_kv_heads) * head_dim of the attention shape");
  }

  // What the expert FFN ops (expert_ffn, expert_ffn_addressed) ask of their rows, whatever holds the
  // weights: x [rows, hidden] grouped by expert_offsets, intermediate with x's rows and y with x's shape,
  // both of x's activation type.
  void expert_ffn_rows(const Tensor& x, const Tensor& expert_offsets, const Tensor& intermediate,
                       const Tensor& y) const {
    tensor("x", x, 2, "[rows, hidden]", Types::kActivation);
    tensor("expert_offsets", expert_offsets, 1, "[num_experts + 1]", Types::kI32);
    tensor("intermediate", intermediate, 2, "[rows, intermediate]", Types::kActivation);
    tensor("y", y, 2, "[rows, hidden]", Types::kActivation);
    same_dim("intermediate", intermediate, 0, "x", x, 0, "the row count");
    same_type("intermediate", intermediate, "x", x, "one activation type");
    same_shape("y", y, "x", x);
    same_type("y", y, "x", x, "one activation type");
  }

  // Row-aligned I32 vector: one entry per row of `rows_of`.
  void per_row(const char* name, const Tensor& t, const char* rows_name, const Tensor& rows_of) const {
    tensor(name, t, 1, "[rows]", Types::kI32);
    if (t.dim(0) != rows_of.dim(0)) fail_pair(name, t, rows_name, rows_of, "one entry per row is needed");
  }

  void kv_pools(const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
                const AttentionShape& shape) const {
    constexpr const char* kLayout = "[num_blocks, kKvBlockSize, num_kv_heads, head_dim]";
    tensor("key_pool", key_pool, 4, kLayout, Types::kActivation);
    tensor("value_pool", value_pool, 4, kLayout, Types::kActivation);
    dim_is("key_pool", key_pool, 1, kKvBlockSize, "kKvBlockSize positions per block");
    dim_is("key_pool", key_pool, 2, shape.num_kv_heads, "num_kv_heads of the attention shape");
    dim_is("key_pool", key_pool, 3, shape.head_dim, "head_dim of the attention shape");
    same_shape("value_pool", value_pool, "key_pool", key_pool);
    same_type("key_pool", key_pool, "qkv", qkv, "the KV cache holds the activation type");
    same_type("value_pool", value_pool, "qkv", qkv, "the KV cache holds the activation type");
  }

 private:
  const char* op_;
  MemorySpace space_;
};

}  // namespace

void check_copy_range(const char* op, MemorySpace space, const Tensor& t, size_t offset, size_t bytes) {
  const OpCheck check(op, space);
  if (t.space != space) {
    check.fail("the tensor is " + t.describe() + " but this backend's memory is on " + space_name(space));
  }
  if (bytes > 0 && t.data == nullptr)
    check.fail("the tensor " + t.describe() + " has no memory (data is null)");
  if (offset > t.bytes() || bytes > t.bytes() - offset) {
    check.fail("bytes [" + std::to_string(offset) + ", " + std::to_string(offset + bytes) + ") are outside " +
               t.describe() + " (" + std::to_string(t.bytes()) + " bytes)");
  }
}

void check_copy(const char* op, MemorySpace space, const Tensor& src, const Tensor& dst) {
  const OpCheck check(op, space);
  if (src.space != space || dst.space != space) {
    check.fail_pair("src", src, "dst", dst,
                    std::string("both must be in this backend's memory, on ") + space_name(space));
  }
  if (src.bytes() != dst.bytes()) check.fail_pair("src", src, "dst", dst, "the byte counts differ");
  if (src.bytes() > 0 && (src.data == nullptr || dst.data == nullptr)) {
    check.fail_pair("src", src, "dst", dst, "one has no memory (data is null)");
  }
}

void check_embed(MemorySpace space, const Tensor& ids, const Tensor& table, const Tensor& out) {
  const OpCheck check("embed", space);
  check.tensor("ids", ids, 1, "[rows]", Types::kI32);
  check.tensor("table", table, 2, "[vocab, hidden]", Types::kWeight);
  check.tensor("out", out, 2, "[rows, hidden]", Types::kActivation);
  check.same_dim("out", out, 0, "ids", ids, 0, "the row count");
  check.same_dim("out", out, 1, "table", table, 1, "hidden");
}

void check_linear(MemorySpace space, const Tensor& x, const Tensor& w, const Tensor& y) {
  const OpCheck check("linear", space);
  check.tensor("x", x, 2, "[rows, in_dim]", Types::kActivation);
  check.tensor("w", w, 2, "[out_dim, in_dim]", Types::kWeight);
  check.tensor("y", y, 2, "[rows, out_dim]", Types::kActivation);
  check.same_dim("w", w, 1, "x", x, 1, "in_dim");
  check.same_dim("y", y, 0, "x", x, 0, "the row count");
  check.same_dim("y", y, 1, "w", w, 0, "out_dim");
  if (y.type != x.type && y.type != ScalarType::kF32) {
    check.fail_pair("y", y, "x", x, "y must have x's type or be f32 (logits)");
  }
}

void check_rms_norm(MemorySpace space, const Tensor& x, const Tensor& weight, const Tensor& y) {
  const OpCheck check("rms_norm", space);
  check.tensor("x", x, 2, "[rows, dim]", Types::kActivation);
  check.tensor("weight", weight, 1, "[dim]", Types::kWeight);
  check.tensor("y", y, 2, "[rows, dim]", Types::kActivation);
  check.same_dim("weight", weight, 0, "x", x, 1, "dim");
  check.same_shape("y", y, "x", x);
}

void check_add_rms_norm(MemorySpace space, const Tensor& delta, const Tensor& residual, const Tensor& weight,
                        const Tensor& normed, const Tensor& normed_f32) {
  const OpCheck check("add_rms_norm", space);
  check.tensor("delta", delta, 2, "[rows, dim]", Types::kActivation);
  check.tensor("residual", residual, 2, "[rows, dim] (the fp32 residual stream)", Types::kF32);
  check.tensor("weight", weight, 1, "[dim]", Types::kWeight);
  check.tensor("normed", normed, 2, "[rows, dim]", Types::kActivation);
  check.same_shape("delta", delta, "residual", residual);
  check.same_dim("weight", weight, 0, "residual", residual, 1, "dim");
  check.same_shape("normed", normed, "residual", residual);
  check.disjoint("delta", delta, "residual", residual);
  check.disjoint("normed", normed, "residual", residual);
  check.disjoint("normed", normed, "delta", delta);
  if (is_absent(normed_f32)) return;
  check.tensor("normed_f32", normed_f32, 2, "[rows, dim], or Tensor{} to leave it out", Types::kF32);
  check.same_shape("normed_f32", normed_f32, "residual", residual);
  check.disjoint("normed_f32", normed_f32, "residual", residual);
  check.disjoint("normed_f32", normed_f32, "delta", delta);
  check.disjoint("normed_f32", normed_f32, "normed", normed);
}

void check_qk_norm_rope(MemorySpace space, const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                        const Tensor& positions, const AttentionShape& shape, double theta) {
  const OpCheck check("qk_norm_rope", space);
  check.attention_shape(shape);
  if (shape.head_dim % 2 != 0) {
    check.fail("head_dim = " + std::to_string(shape.head_dim) +
               " is odd; rotate-half pairs element i with i + head_dim/2, so head_dim must be even");
  }
  if (!(theta > 0.0) || !std::isfinite(theta)) {
    check.fail("theta = " + std::to_string(theta) + " must be finite and > 0 (rope_theta in config.json)");
  }
  check.qkv(qkv, shape);
  check.tensor("q_norm", q_norm, 1, "[head_dim]", Types::kWeight);
  check.tensor("k_norm", k_norm, 1, "[head_dim]", Types::kWeight);
  check.dim_is("q_norm", q_norm, 0, shape.head_dim, "head_dim of the attention shape");
  check.dim_is("k_norm", k_norm, 0, shape.head_dim, "head_dim of the attention shape");
  check.per_row("positions", positions, "qkv", qkv);
}

void check_store_kv(MemorySpace space, const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool,
                    const Tensor& value_pool, const AttentionShape& shape) {
  const OpCheck check("store_kv", space);
  check.attention_shape(shape);
  check.qkv(qkv, shape);
  check.per_row("slot_mapping", slot_mapping, "qkv", qkv);
  check.kv_pools(qkv, key_pool, value_pool, shape);
}

void check_attention(MemorySpace space, const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
                     const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
                     const AttentionShape& shape, const Tensor& out) {
  const OpCheck check("attention", space);
  check.attention_shape(shape);
  check.qkv(qkv, shape);
  check.kv_pools(qkv, key_pool, value_pool, shape);
  check.tensor("block_tables", block_tables, 2, "[num_sequences, max_blocks]", Types::kI32);
  check.per_row("row_sequence", row_sequence, "qkv", qkv);
  check.per_row("positions", positions, "qkv", qkv);
  check.tensor("out", out, 2, "[rows, num_heads * head_dim]", Types::kActivation);
  check.same_dim("out", out, 0, "qkv", qkv, 0, "the row count");
  check.dim_is("out", out, 1, shape.q_dim(), "num_heads * head_dim of the attention shape");
  check.same_type("out", out, "qkv", qkv, "one activation type");
}

void check_silu_mul(MemorySpace space, const Tensor& gate_up, const Tensor& out) {
  const OpCheck check("silu_mul", space);
  check.tensor("gate_up", gate_up, 2, "[rows, 2 * intermediate]", Types::kActivation);
  check.tensor("out", out, 2, "[rows, intermediate]", Types::kActivation);
  check.same_dim("out", out, 0, "gate_up", gate_up, 0, "the row count");
  if (gate_up.dim(1) != 2 * out.dim(1)) {
    check.fail_pair("gate_up", gate_up, "out", out, "gate_up must hold 2 * out's columns (gate, then up)");
  }
  check.same_type("out", out, "gate_up", gate_up, "one activation type");
}

void check_add(MemorySpace space, const Tensor& x, const Tensor& y) {
  const OpCheck check("add", space);
  check.tensor("x", x, x.rank, "any", Types::kActivation);
  check.tensor("y", y, y.rank, "any", Types::kActivation);
  check.same_shape("x", x, "y", y);
}

void check_gather_rows(MemorySpace space, const Tensor& x, const Tensor& index, const Tensor& out) {
  const OpCheck check("gather_rows", space);
  if (x.rank < 1) check.fail("x is " + x.describe() + "; it must have rows (rank >= 1)");
  check.tensor("x", x, x.rank, "[rows, ...]", Types::kAny);
  check.tensor("index", index, 1, "[m]", Types::kI32);
  check.tensor("out", out, x.rank, "[m, ...] like x", Types::kAny);
  check.same_type("out", out, "x", x, "rows are copied as they are");
  check.same_dim("out", out, 0, "index", index, 0, "the row count");
  if (out.row_elements() != x.row_elements()) check.fail_pair("out", out, "x", x, "the row size differs");
  for (int i = 1; i < x.rank; ++i) check.same_dim("out", out, i, "x", x, i, "a row dimension");
}

void check_argmax(MemorySpace space, const Tensor& logits, const Tensor& ids) {
  const OpCheck check("argmax", space);
  check.tensor("logits", logits, 2, "[rows, vocab]", Types::kActivation);
  check.tensor("ids", ids, 1, "[rows]", Types::kI32);
  if (logits.dim(1) < 1) check.fail("logits is " + logits.describe() + ": the vocabulary must not be empty");
  check.same_dim("ids", ids, 0, "logits", logits, 0, "the row count");
}

void check_log_softmax(MemorySpace space, const Tensor& logits, const Tensor& out) {
  const OpCheck check("log_softmax", space);
  check.tensor("logits", logits, 2, "[rows, vocab]", Types::kF32);
  check.tensor("out", out, 2, "[rows, vocab]", Types::kF32);
  if (logits.dim(1) < 1) check.fail("logits is " + logits.describe() + ": the vocabulary must not be empty");
  check.same_shape("out", out, "logits", logits);
  check.disjoint("out", out, "logits", logits);
}

void check_score_rows(MemorySpace space, const Tensor& logits, const Tensor& targets,
                      const Tensor& reference_log_probs, const Tensor& scores, const Tensor& ids) {
  const OpCheck check("score_rows", space);
  check.tensor("logits", logits, 2, "[rows, vocab]", Types::kF32);
  check.tensor("reference_log_probs", reference_log_probs, 2, "[rows, vocab]", Types::kF32);
  check.tensor("scores", scores, 2, "[rows, kNumRowScores]", Types::kF32);
  if (logits.dim(1) < 1) check.fail("logits is " + logits.describe() + ": the vocabulary must not be empty");
  check.same_shape("reference_log_probs", reference_log_probs, "logits", logits);
  check.per_row("targets", targets, "logits", logits);
  check.per_row("ids", ids, "logits", logits);
  check.same_dim("scores", scores, 0, "logits", logits, 0, "the row count");
  check.dim_is("scores", scores, 1, kNumRowScores, "one column per RowScoreColumn");
  check.disjoint("scores", scores, "logits", logits);
  check.disjoint("scores", scores, "reference_log_probs", reference_log_probs);
  check.disjoint("scores", scores, "targets", targets);
  check.disjoint("ids", ids, "logits", logits);
  check.disjoint("ids", ids, "reference_log_probs", reference_log_probs);
  check.disjoint("ids", ids, "targets", targets);
  check.disjoint("ids", ids, "scores", scores);
}

void check_route_top_k(MemorySpace space, const Tensor& logits, const Tensor& present,
                       const Tensor& expert_ids, const Tensor& weights, const Tensor& row_top_k) {
  const OpCheck check("route_top_k", space);
  check.tensor("logits", logits, 2, "[tokens, num_experts]", Types::kActivation);
  check.tensor("present", present, 1, "[num_experts]", Types::kU8);
  check.tensor("expert_ids", expert_ids, 2, "[tokens, top_k]", Types::kI32);
  check.tensor("weights", weights, 2, "[tokens, top_k]", Types::kF32);
  check.same_dim("present", present, 0, "logits", logits, 1, "num_experts");
  check.same_dim("expert_ids", expert_ids, 0, "logits", logits, 0, "the token count");
  check.same_shape("weights", weights, "expert_ids", expert_ids);
  const int64_t top_k = expert_ids.dim(1);
  if (top_k < 1) check.fail("top_k = " + std::to_string(top_k) + " (expert_ids' columns) must be >= 1");
  if (top_k > logits.dim(1)) {
    check.fail_pair(
        "expert_ids", expert_ids, "logits", logits,
        "top_k = " + std::to_string(top_k) + " exceeds the " + std::to_string(logits.dim(1)) + " experts");
  }
  if (!is_absent(row_top_k)) {
    check.tensor("row_top_k", row_top_k, 1, "[tokens]", Types::kI32);
    check.same_dim("row_top_k", row_top_k, 0, "logits", logits, 0, "the token count");
  }
}

void check_group_by_expert(MemorySpace space, const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                           const Tensor& expert_offsets, const Tensor& source_row,
                           const Tensor& sorted_position) {
  const OpCheck check("group_by_expert", space);
  if (num_experts < 1) check.fail("num_experts = " + std::to_string(num_experts) + " must be >= 1");
  if (top_k < 1) check.fail("top_k = " + std::to_string(top_k) + " must be >= 1");
  if (expert_ids.rank == 2) {
    check.tensor("expert_ids", expert_ids, 2, "[tokens, top_k]", Types::kI32);
    check.dim_is("expert_ids", expert_ids, 1, top_k, "top_k");
  } else {
    check.tensor("expert_ids", expert_ids, 1, "[slots] (or [tokens, top_k])", Types::kI32);
  }
  const int64_t slots = expert_ids.numel();
  if (slots % top_k != 0) {
    check.fail("expert_ids is " + expert_ids.describe() + ": " + std::to_string(slots) +
               " slots are not a whole number of tokens of top_k = " + std::to_string(top_k));
  }
  check.tensor("expert_offsets", expert_offsets, 1, "[num_experts + 1]", Types::kI32);
  check.dim_is("expert_offsets", expert_offsets, 0, num_experts + 1, "num_experts + 1");
  check.tensor("source_row", source_row, 1, "[slots]", Types::kI32);
  check.dim_is("source_row", source_row, 0, slots, "one entry per slot of expert_ids");
  check.tensor("sorted_position", sorted_position, 1, "[slots]", Types::kI32);
  check.dim_is("sorted_position", sorted_position, 0, slots, "one entry per slot of expert_ids");
}

void check_count_routed_slots(MemorySpace space, const Tensor& expert_ids, const Tensor& real_tokens,
                              const Tensor& expert_counts, const Tensor& keys, const Tensor& key_counts) {
  const OpCheck check("count_routed_slots", space);
  check.tensor("expert_ids", expert_ids, 2, "[tokens, top_k]", Types::kI32);
  if (!is_absent(real_tokens)) {
    check.tensor("real_tokens", real_tokens, 1, "[1]", Types::kI32);
    check.dim_is("real_tokens", real_tokens, 0, 1, "one count");
  }
  check.tensor("expert_counts", expert_counts, 1, "[num_experts]", Types::kI64);
  if (is_absent(keys) != is_absent(key_counts))
    check.fail("keys and key_counts come together (both or neither): keys is " + keys.describe() +
               ", key_counts is " + key_counts.describe());
  if (!is_absent(keys)) {
    check.tensor("keys", keys, 2, "[tokens, top_k]", Types::kI32);
    check.same_shape("keys", keys, "expert_ids", expert_ids);
    check.tensor("key_counts", key_counts, 1, "[keys]", Types::kI64);
  }
}

void check_expert_ffn(MemorySpace space, const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up,
                      const Tensor& down, const Tensor& local_index, const Tensor& intermediate,
                      const Tensor& y) {
  const OpCheck check("expert_ffn", space);
  check.expert_ffn_rows(x, expert_offsets, intermediate, y);
  check.tensor("gate_up", gate_up, 3, "[hosted experts, 2 * intermediate, hidden]", Types::kWeight);
  check.tensor("down", down, 3, "[hosted experts, hidden, intermediate]", Types::kWeight);
  check.tensor("local_index", local_index, 1, "[num_experts]", Types::kI32);
  if (expert_offsets.dim(0) != local_index.dim(0) + 1) {
    check.fail_pair("expert_offsets", expert_offsets, "local_index", local_index,
                    "expert_offsets needs num_experts + 1 entries for local_index's num_experts");
  }
  if (gate_up.dim(1) % 2 != 0) {
    check.fail("gate_up is " + gate_up.describe() + ": dimension 1 must be even (gate rows, then up rows)");
  }
  check.same_type("down", down, "gate_up", gate_up, "one weight type per layer");
  check.same_dim("down", down, 0, "gate_up", gate_up, 0, "the number of hosted experts");
  check.same_dim("gate_up", gate_up, 2, "x", x, 1, "hidden");
  check.same_dim("down", down, 1, "x", x, 1, "hidden");
  if (down.dim(2) * 2 != gate_up.dim(1)) {
    check.fail_pair("down", down, "gate_up", gate_up,
                    "the intermediate size differs (down's I, gate_up's 2I)");
  }
  check.same_dim("intermediate", intermediate, 1, "down", down, 2, "the intermediate size");
}

void check_combine_top_k(MemorySpace space, const Tensor& expert_out, const Tensor& sorted_position,
                         const Tensor& weights, const Tensor& out) {
  const OpCheck check("combine_top_k", space);
  check.tensor("weights", weights, 2, "[tokens, top_k]", Types::kF32);
  check.tensor("sorted_position", sorted_position, sorted_position.rank == 2 ? 2 : 1, "[tokens * top_k]",
               Types::kI32);
  check.tensor("expert_out", expert_out, 2, "[tokens * top_k, hidden]", Types::kActivation);
  check.tensor("out", out, 2, "[tokens, hidden]", Types::kActivation);
  if (sorted_position.numel() != weights.numel()) {
    check.fail_pair("sorted_position", sorted_position, "weights", weights,
                    "one entry per (token, slot) is needed");
  }
  if (expert_out.dim(0) != weights.numel()) {
    check.fail_pair("expert_out", expert_out, "weights", weights, "one row per (token, slot) is needed");
  }
  check.same_dim("out", out, 0, "weights", weights, 0, "the token count");
  check.same_dim("out", out, 1, "expert_out", expert_out, 1, "hidden");
  // out may be F32 whatever expert_out is: the sum feeds the fp32 residual stream unrounded.
  if (out.type != ScalarType::kF32)
    check.same_type("out", out, "expert_out", expert_out, "one activation type");
}

void check_decode_attention(MemorySpace space, const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                            const Tensor& key_pool, const Tensor& value_pool, const AttentionTables& tables,
                            const AttentionShape& shape, double theta, const Tensor& out) {
  const auto step = [](const char* name, const auto& check) {
    try {
      check();
    } catch (const Error& error) {
      throw Error(error.code(), std::string("decode_attention: the ") + name + " step: " + error.what());
    }
  };
  step("qk_norm_rope",
       [&] { check_qk_norm_rope(space, qkv, q_norm, k_norm, tables.positions, shape, theta); });
  step("store_kv", [&] { check_store_kv(space, qkv, tables.slot_mapping, key_pool, value_pool, shape); });
  step("attention", [&] {
    check_attention(space, qkv, key_pool, value_pool, tables.block_tables, tables.row_sequence,
                    tables.positions, shape, out);
  });
}

void check_expert_ffn_addressed(MemorySpace space, const Tensor& x, const Tensor& expert_offsets,
                                const Tensor& addresses, ScalarType weight_type, const Tensor& intermediate,
                                const Tensor& y) {
  const OpCheck check("expert_ffn_addressed", space);
  check.expert_ffn_rows(x, expert_offsets, intermediate, y);
  check.tensor("addresses", addresses, 2, "[num_experts, 2] (gate_up and down of each expert)", Types::kI64);
  if (addresses.dim(1) != 2)
    check.fail("addresses is " + addresses.describe() + ": dimension 1 must be 2 (gate_up, then down)");
  if (expert_offsets.dim(0) != addresses.dim(0) + 1) {
    check.fail_pair("expert_offsets", expert_offsets, "addresses", addresses,
                    "expert_offsets needs num_experts + 1 entries for the table's num_experts");
  }
  if (weight_type != ScalarType::kF32 && weight_type != ScalarType::kBF16)
    check.fail(std::string("the weight type is ") + scalar_name(weight_type) + "; it must be f32 or bf16");
}

void check_routed_moe(MemorySpace space, const Tensor& router_input, const Tensor& x,
                      const RoutedMoeWeights& weights, const RoutedMoeScratch& scratch, const Tensor& out) {
  const auto step = [](const char* name, const auto& check) {
    try {
      check();
    } catch (const Error& error) {
      throw Error(error.code(), std::string("routed_moe: the ") + name + " step: " + error.what());
    }
  };
  const RoutedMoeScratch& s = scratch;
  step("router", [&] { check_linear(space, router_input, weights.router, s.logits); });
  step("route", [&] {
    check_route_top_k(space, s.logits, weights.present, s.expert_ids, s.weights, weights.row_top_k);
  });
  const int64_t top_k = s.expert_ids.dim(1);
  if (top_k < 1) {
    throw Error(ErrorCode::kInvalidArgument, "routed_moe: expert_ids is " + s.expert_ids.describe() +
                                                 "; top_k (dimension 1) must be >= 1");
  }
  step("group", [&] {
    check_group_by_expert(space, s.expert_ids.reshaped({s.expert_ids.numel()}), weights.router.dim(0), top_k,
                          s.expert_offsets, s.source_row, s.sorted_position);
  });
  step("gather", [&] { check_gather_rows(space, x, s.source_row, s.sorted_rows); });
  step("expert", [&] {
    if (!is_absent(weights.addresses)) {
      check_expert_ffn_addressed(space, s.sorted_rows, s.expert_offsets, weights.addresses,
                                 weights.addressed_weight_type, s.intermediate, s.expert_out);
    } else {
      check_expert_ffn(space, s.sorted_rows, s.expert_offsets, weights.gate_up, weights.down,
                       weights.local_index, s.intermediate, s.expert_out);
    }
  });
  step("combine", [&] { check_combine_top_k(space, s.expert_out, s.sorted_position, s.weights, out); });
  if (router_input.dim(0) != x.dim(0)) {
    throw Error(ErrorCode::kInvalidArgument, "routed_moe: router_input is " + router_input.describe() +
                                                 " but x is " + x.describe() + ": the token counts differ");
  }
}

}  // namespace epic::backend_checks
