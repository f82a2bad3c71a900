// Backend::decode_attention's default: the three ops it is made of (kernels/backend.h).
#include "kernels/backend.h"
#include "kernels/backend_checks.h"

namespace epic {

void Backend::decode_attention(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                               const Tensor& key_pool, const Tensor& value_pool,
                               const AttentionTables& tables, const AttentionShape& shape, float eps,
                               double theta, const Tensor& out) {
  backend_checks::check_decode_attention(memory_space(), qkv, q_norm, k_norm, key_pool, value_pool, tables,
                                         shape, theta, out);
  run_decode_attention_ops(qkv, q_norm, k_norm, key_pool, value_pool, tables, shape, eps, theta, out);
}

void Backend::run_decode_attention_ops(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                                       const Tensor& key_pool, const Tensor& value_pool,
                                       const AttentionTables& tables, const AttentionShape& shape, float eps,
                                       double theta, const Tensor& out) {
  qk_norm_rope(qkv, q_norm, k_norm, tables.positions, shape, eps, theta);
  store_kv(qkv, tables.slot_mapping, key_pool, value_pool, shape);
  attention(qkv, key_pool, value_pool, tables.block_tables, tables.row_sequence, tables.positions, shape,
            out);
}

}  // namespace epic
