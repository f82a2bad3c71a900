// Argument checks shared by every Backend: each throws Error(kInvalidArgument) naming the backend,
// the op and the offending values before an op could read or write out of bounds.
#pragma once

#include <cstdint>

namespace epic::backend_checks {

void check_linear(const char* backend, int64_t rows, int64_t in_dim, int64_t out_dim);
void check_rms_norm(const char* backend, int64_t rows, int64_t dim);
void check_rope(const char* backend, int64_t num_tokens, int64_t num_heads, int64_t head_dim, double theta);
void check_attention(const char* backend, int64_t num_queries, int64_t num_keys, int64_t first_position,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
void check_silu_mul(const char* backend, int64_t n);
// num_present: how many of the num_experts entries of present are non-zero.
void check_route_top_k(const char* backend, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                       int64_t num_present);
void check_scaled_add_rows(const char* backend, int64_t rows, int64_t dim);
void check_add(const char* backend, int64_t n);

}  // namespace epic::backend_checks
