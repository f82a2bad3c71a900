// Argument checks shared by every Backend (see backend_checks.h).
#include "kernels/backend_checks.h"

#include <cmath>
#include <string>

#include "kernels/error.h"

namespace epic::backend_checks {
namespace {

[[noreturn]] void fail(const char* backend, const char* op, const std::string& what) {
  throw Error(ErrorCode::kInvalidArgument, std::string(backend) + " backend " + op + ": " + what);
}

void check_non_negative(const char* backend, const char* op, const char* name, int64_t value) {
  if (value < 0) {
    fail(backend, op, std::string(name) + " = " + std::to_string(value) + " is negative");
  }
}

}  // namespace

void check_linear(const char* backend, int64_t rows, int64_t in_dim, int64_t out_dim) {
  check_non_negative(backend, "linear", "rows", rows);
  check_non_negative(backend, "linear", "in_dim", in_dim);
  check_non_negative(backend, "linear", "out_dim", out_dim);
}

void check_rms_norm(const char* backend, int64_t rows, int64_t dim) {
  check_non_negative(backend, "rms_norm", "rows", rows);
  check_non_negative(backend, "rms_norm", "dim", dim);
}

void check_rope(const char* backend, int64_t num_tokens, int64_t num_heads, int64_t head_dim, double theta) {
  check_non_negative(backend, "rope", "num_tokens", num_tokens);
  check_non_negative(backend, "rope", "num_heads", num_heads);
  check_non_negative(backend, "rope", "head_dim", head_dim);
  if (head_dim % 2 != 0) {
    fail(backend, "rope",
         "head_dim = " + std::to_string(head_dim) +
             " is odd; rotate-half pairs element i with i + head_dim/2, so head_dim must be even");
  }
  if (!(theta > 0.0) || !std::isfinite(theta)) {
    fail(backend, "rope",
         "theta = " + std::to_string(theta) + " must be finite and > 0 (rope_theta in config.json)");
  }
}

void check_attention(const char* backend, int64_t num_queries, int64_t num_keys, int64_t first_position,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_non_negative(backend, "attention", "num_queries", num_queries);
  check_non_negative(backend, "attention", "num_keys", num_keys);
  check_non_negative(backend, "attention", "first_position", first_position);
  check_non_negative(backend, "attention", "num_heads", num_heads);
  check_non_negative(backend, "attention", "head_dim", head_dim);
  if (num_kv_heads <= 0) {
    fail(backend, "attention", "num_kv_heads = " + std::to_string(num_kv_heads) + " must be >= 1");
  }
  if (num_heads % num_kv_heads != 0) {
    fail(backend, "attention",
         "num_heads = " + std::to_string(num_heads) + " is not a multiple of num_kv_heads = " +
             std::to_string(num_kv_heads) + "; each kv head must serve a whole group of query heads");
  }
  // Query i reads keys 0 .. first_position + i, so fewer keys would read past the end of k and v.
  if (num_keys != first_position + num_queries) {
    fail(backend, "attention",
         "num_keys = " + std::to_string(num_keys) +
             " must equal first_position + num_queries = " + std::to_string(first_position) + " + " +
             std::to_string(num_queries) + " (k and v hold every key of the sequence so far)");
  }
}

void check_silu_mul(const char* backend, int64_t n) { check_non_negative(backend, "silu_mul", "n", n); }

void check_route_top_k(const char* backend, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                       int64_t num_present) {
  check_non_negative(backend, "route_top_k", "num_tokens", num_tokens);
  check_non_negative(backend, "route_top_k", "num_experts", num_experts);
  if (top_k < 1) {
    fail(backend, "route_top_k", "top_k = " + std::to_string(top_k) + " must be >= 1");
  }
  if (top_k > num_present) {
    fail(backend, "route_top_k",
         "top_k = " + std::to_string(top_k) + " exceeds the " + std::to_string(num_present) +
             " present experts (of " + std::to_string(num_experts) + "); load more experts or lower top_k");
  }
}

void check_scaled_add_rows(const char* backend, int64_t rows, int64_t dim) {
  check_non_negative(backend, "scaled_add_rows", "rows", rows);
  check_non_negative(backend, "scaled_add_rows", "dim", dim);
}

void check_add(const char* backend, int64_t n) { check_non_negative(backend, "add", "n", n); }

}  // namespace epic::backend_checks
