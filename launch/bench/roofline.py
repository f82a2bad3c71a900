#!/usr/bin/env python3
"""Roofline of a Qwen3-MoE decode step and prefill: bytes actually read, FLOPs, and the time a card
with a given read bandwidth and GEMM rate needs at least (issue 7, "Speed").

Counted per decode step of `batch` sequences that each hold `context` tokens in the KV cache:
  bytes  = weights actually read (expected distinct experts hit per layer, attention, router, norms,
           lm_head, the embedding rows looked up) + KV cache read + KV cache written;
  FLOPs  = 2 x multiply-adds of every matrix product (projections, attention scores and values,
           router, experts, lm_head); elementwise work (norms, RoPE, softmax, SwiGLU) is left out.
roofline time = max(bytes / bandwidth, FLOPs / GEMM rate); tokens/s = batch / time.

With B tokens each choosing k distinct experts of E uniformly at random, an expert is missed by
one token with probability 1 - k/E, so the expected number hit is E * (1 - (1 - k/E)^B).

Importable (decode_step, prefill, model_parameters) and a CLI printing one JSON object per line:
  python3 launch/bench/roofline.py --preset configs/presets/qwen3-30b-a3b.json \
      --batch 1 16 64 256 --context 64 --bandwidth-gbs 4270 --gemm-tflops 790 --prefill-tokens 4096
  python3 launch/bench/roofline.py --preset ... --from-baselines bench/baselines.jsonl ...
"""

import argparse
import dataclasses
import json
import sys


@dataclasses.dataclass(frozen=True)
class MoeShape:
    hidden: int
    moe_intermediate: int  # per expert
    experts: int
    top_k: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    weight_bytes: int = 2  # bf16 weights
    kv_bytes: int = 2  # bf16 KV cache

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"MoeShape.{field.name} must be positive, got {getattr(self, field.name)}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} exceeds the number of experts {self.experts}")


# Qwen3-30B-A3B (configs/presets/qwen3-30b-a3b.json), the shape issue 7's targets are stated for.
QWEN3_30B_A3B = MoeShape(hidden=2048, moe_intermediate=768, experts=128, top_k=8, layers=48, heads=32,
                         kv_heads=4, head_dim=128, vocab=151936)


def shape_from_hf_config(config, weight_bytes=2, kv_bytes=2):
    """A MoeShape from a Hugging Face style config dict (or a preset file's "config" object)."""
    experts = config.get("num_experts", config.get("num_local_experts"))
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return MoeShape(hidden=config["hidden_size"], moe_intermediate=config["moe_intermediate_size"], experts=experts,
                    top_k=config["num_experts_per_tok"], layers=config["num_hidden_layers"],
                    heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"], head_dim=head_dim,
                    vocab=config["vocab_size"], weight_bytes=weight_bytes, kv_bytes=kv_bytes)


def expected_distinct_experts(experts, top_k, num_tokens):
    """Expected number of distinct experts hit by num_tokens tokens, each picking top_k of experts."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return experts * (1.0 - (1.0 - top_k / experts) ** num_tokens)


def _attention_parameters(s):
    q_and_o = 2 * s.hidden * s.heads * s.head_dim
    k_and_v = 2 * s.hidden * s.kv_heads * s.head_dim
    return q_and_o + k_and_v


def _norm_parameters_per_layer(s):
    return 2 * s.hidden + 2 * s.head_dim  # input + post-attention norms, q_norm + k_norm


def _expert_parameters(s):
    return 3 * s.hidden * s.moe_intermediate  # gate, up, down


def model_parameters(s):
    """Parameter counts of the whole model (embedding and lm_head untied, as Qwen3-30B-A3B)."""
    per_layer = (_attention_parameters(s) + _norm_parameters_per_layer(s) + s.experts * s.hidden +
                 s.experts * _expert_parameters(s))
    total = s.layers * per_layer + 2 * s.vocab * s.hidden + s.hidden
    active_per_token = (s.layers * (_attention_parameters(s) + _norm_parameters_per_layer(s) + s.experts * s.hidden +
                                    s.top_k * _expert_parameters(s)) + 2 * s.vocab * s.hidden + s.hidden)
    return {"total": total, "active_per_token": active_per_token}


def _flops_per_token(s, attended_tokens):
    """FLOPs of one token through the model; attended_tokens: the keys it attends to (cache + itself)."""
    projections = 2 * _attention_parameters(s)
    scores_and_values = 2 * 2 * s.heads * s.head_dim * attended_tokens
    router = 2 * s.hidden * s.experts
    experts = 2 * s.top_k * _expert_parameters(s)
    return s.layers * (projections + scores_and_values + router + experts) + 2 * s.hidden * s.vocab


def _time(bytes_moved, flops, bandwidth_gbs, gemm_tflops):
    """Roofline seconds and what bounds them; None where a rate is missing."""
    if bandwidth_gbs is None or gemm_tflops is None:
        return None
    memory_s = bytes_moved / (bandwidth_gbs * 1e9)
    compute_s = flops / (gemm_tflops * 1e12)
    return {"memory_s": memory_s, "compute_s": compute_s, "time_s": max(memory_s, compute_s),
            "bound": "memory" if memory_s >= compute_s else "compute"}


def decode_step(s, batch, context, bandwidth_gbs=None, gemm_tflops=None):
    """One decode step: batch sequences, each one new token, each with context tokens already cached."""
    if batch <= 0 or context < 0:
        raise ValueError(f"batch must be > 0 and context >= 0, got batch {batch}, context {context}")
    distinct = expected_distinct_experts(s.experts, s.top_k, batch)
    wb = s.weight_bytes
    expert_bytes = s.layers * distinct * _expert_parameters(s) * wb
    dense_bytes = (s.layers * (_attention_parameters(s) + _norm_parameters_per_layer(s) + s.experts * s.hidden) +
                   s.vocab * s.hidden + s.hidden) * wb  # attention, norms, router; lm_head; final norm
    embedding_bytes = batch * s.hidden * wb  # only the rows looked up
    kv_per_token = s.layers * 2 * s.kv_heads * s.head_dim * s.kv_bytes
    kv_read = batch * context * kv_per_token
    kv_written = batch * kv_per_token
    weight_bytes = expert_bytes + dense_bytes + embedding_bytes
    total_bytes = weight_bytes + kv_read + kv_written
    flops = batch * _flops_per_token(s, context + 1)
    result = {"batch": batch, "context": context, "distinct_experts_per_layer": distinct,
              "expert_weight_bytes": expert_bytes, "other_weight_bytes": dense_bytes + embedding_bytes,
              "weight_bytes": weight_bytes, "kv_read_bytes": kv_read, "kv_write_bytes": kv_written,
              "bytes": total_bytes, "flops": flops}
    timing = _time(total_bytes, flops, bandwidth_gbs, gemm_tflops)
    if timing is not None:
        result.update(timing)
        result["tokens_per_s"] = batch / timing["time_s"]
    return result


def prefill(s, batch, prompt_tokens, bandwidth_gbs=None, gemm_tflops=None):
    """One forward over batch prompts of prompt_tokens each (causal attention, KV cache written)."""
    if batch <= 0 or prompt_tokens <= 0:
        raise ValueError(f"batch and prompt_tokens must be > 0, got {batch}, {prompt_tokens}")
    num_tokens = batch * prompt_tokens
    distinct = expected_distinct_experts(s.experts, s.top_k, num_tokens)
    wb = s.weight_bytes
    weight_bytes = (s.layers * (distinct * _expert_parameters(s) + _attention_parameters(s) +
                                _norm_parameters_per_layer(s) + s.experts * s.hidden) +
                    s.vocab * s.hidden + s.hidden + num_tokens * s.hidden) * wb
    kv_written = num_tokens * s.layers * 2 * s.kv_heads * s.head_dim * s.kv_bytes
    # Token t attends to t + 1 keys: the sum over a prompt is P (P + 1) / 2. lm_head on every token,
    # as a full forward does; a server computing only the last token's logits does less.
    per_token_without_attention = _flops_per_token(s, 0)
    attention = s.layers * 2 * 2 * s.heads * s.head_dim * prompt_tokens * (prompt_tokens + 1) // 2
    flops = batch * (prompt_tokens * per_token_without_attention + attention)
    lm_head_flops_skipped = (num_tokens - batch) * 2 * s.hidden * s.vocab
    result = {"batch": batch, "prompt_tokens": prompt_tokens, "distinct_experts_per_layer": distinct,
              "weight_bytes": weight_bytes, "kv_write_bytes": kv_written, "bytes": weight_bytes + kv_written,
              "flops": flops, "flops_last_token_logits": flops - lm_head_flops_skipped}
    timing = _time(weight_bytes + kv_written, flops, bandwidth_gbs, gemm_tflops)
    if timing is not None:
        result.update(timing)
    return result


def rates_from_baselines(path):
    """(read bandwidth GB/s, bf16 GEMM TFLOP/s) from the JSON lines launch/bench/baselines.py prints."""
    bandwidth = gemm = None
    with open(path) as lines:
        for line in lines:
            line = line.strip()
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("name") == "read_bandwidth_sum" and "gb_per_s" in record:
                bandwidth = record["gb_per_s"]
            elif record.get("name") == "gemm_bf16" and "tflop_per_s" in record:
                gemm = record["tflop_per_s"]
    return bandwidth, gemm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="preset JSON (configs/presets/*.json) or HF config.json; "
                        "default: Qwen3-30B-A3B's shapes")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--weight-bytes", type=int, default=2, help="bytes per weight (2: bf16, 4: fp32)")
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV cache element")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=64, help="tokens already cached per sequence")
    parser.add_argument("--prefill-tokens", type=int, default=0, help="also print a batch-1 prefill of N tokens")
    parser.add_argument("--bandwidth-gbs", type=float, help="measured read bandwidth, GB/s (1e9 bytes)")
    parser.add_argument("--gemm-tflops", type=float, help="measured bf16 GEMM rate, TFLOP/s")
    parser.add_argument("--from-baselines", help="take both rates from baselines.py's JSON lines")
    args = parser.parse_args(argv)

    if args.preset:
        with open(args.preset) as f:
            config = json.load(f)
        config = config.get("config", config)
        if args.layers:
            config = dict(config, num_hidden_layers=args.layers)
        shape = shape_from_hf_config(config, args.weight_bytes, args.kv_bytes)
    else:
        shape = dataclasses.replace(QWEN3_30B_A3B, layers=args.layers or QWEN3_30B_A3B.layers,
                                    weight_bytes=args.weight_bytes, kv_bytes=args.kv_bytes)
    bandwidth, gemm = args.bandwidth_gbs, args.gemm_tflops
    if args.from_baselines:
        measured_bandwidth, measured_gemm = rates_from_baselines(args.from_baselines)
        bandwidth = bandwidth if bandwidth is not None else measured_bandwidth
        gemm = gemm if gemm is not None else measured_gemm

    common = {"bandwidth_gbs": bandwidth, "gemm_tflops": gemm}
    print(json.dumps({"name": "roofline_shape", **dataclasses.asdict(shape), **model_parameters(shape), **common}))
    for batch in args.batch:
        print(json.dumps({"name": "roofline_decode_step", **decode_step(shape, batch, args.context, bandwidth, gemm)}))
    if args.prefill_tokens:
        print(json.dumps({"name": "roofline_prefill", **prefill(shape, 1, args.prefill_tokens, bandwidth, gemm)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
