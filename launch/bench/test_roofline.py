"""Checks of launch/bench/roofline.py: one case counted by hand, the published Qwen3-30B-A3B sizes,
and the limits of the expected-distinct-experts formula. Run: cd launch/bench && python3 -m unittest"""

import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

# hidden 4, expert intermediate 2, 4 experts top-2, 1 layer, 2 heads / 1 KV head of dim 2, vocab 8.
TINY = roofline.MoeShape(hidden=4, moe_intermediate=2, experts=4, top_k=2, layers=1, heads=2, kv_heads=1,
                         head_dim=2, vocab=8)


class HandCountedDecodeStep(unittest.TestCase):
    """TINY at batch 2, context 3, counted on paper (bf16: 2 bytes a weight and a KV element)."""

    def test_bytes_flops_and_time(self):
        # Distinct experts: 4 * (1 - (1 - 2/4)^2) = 3.
        # Experts: 3 experts * (gate 4x2 + up 4x2 + down 2x4 = 24) * 2 B = 144 B.
        # Router 4x4 = 16 -> 32 B. Attention q 4x4 + k 4x2 + v 4x2 + o 4x4 = 48 -> 96 B.
        # Norms: input 4 + post 4 + q_norm 2 + k_norm 2 = 12 -> 24 B. lm_head 8x4 = 32 -> 64 B.
        # Final norm 4 -> 8 B. Embedding rows: 2 tokens x 4 -> 16 B. Weights: 384 B.
        # KV read: 2 (K,V) x 1 head x 2 dim x 3 cached x 2 seqs x 2 B = 48 B; written: 2x1x2x2x2 = 16 B.
        # FLOPs per token: projections 2 x 48 = 96; scores + values 2 x 2 x (2 heads x 2 dim) x 4 keys = 64;
        # router 2 x 16 = 32; experts 2 x 2 experts x 24 = 96; lm_head 2 x 32 = 64 -> 352; x 2 tokens = 704.
        step = roofline.decode_step(TINY, batch=2, context=3, bandwidth_gbs=0.448, gemm_tflops=0.000352)
        self.assertAlmostEqual(step["distinct_experts_per_layer"], 3.0, places=12)
        self.assertAlmostEqual(step["expert_weight_bytes"], 144.0, places=9)
        self.assertAlmostEqual(step["weight_bytes"], 384.0, places=9)
        self.assertEqual(step["kv_read_bytes"], 48)
        self.assertEqual(step["kv_write_bytes"], 16)
        self.assertAlmostEqual(step["bytes"], 448.0, places=9)
        self.assertEqual(step["flops"], 704)
        # 448 B at 0.448 GB/s = 1 us; 704 FLOP at 352 MFLOP/s = 2 us: compute bound, 2 tokens / 2 us.
        self.assertAlmostEqual(step["memory_s"], 1e-6, delta=1e-15)
        self.assertAlmostEqual(step["compute_s"], 2e-6, delta=1e-15)
        self.assertEqual(step["bound"], "compute")
        self.assertAlmostEqual(step["tokens_per_s"], 1e6, delta=1e-3)

    def test_hand_counted_prefill(self):
        # 3 tokens: distinct 4 * (1 - 0.5^3) = 3.5; weights (3.5 x 24 + 48 + 12 + 16 + 32 + 4 + 3 x 4) x 2 B.
        # FLOPs: 3 x (96 + 32 + 96 + 64) + attention 2 x 2 x 4 x (1 + 2 + 3 keys) = 864 + 96 = 960.
        result = roofline.prefill(TINY, batch=1, prompt_tokens=3)
        self.assertAlmostEqual(result["weight_bytes"], (3.5 * 24 + 48 + 12 + 16 + 32 + 4 + 12) * 2, places=9)
        self.assertEqual(result["kv_write_bytes"], 3 * 2 * 1 * 2 * 2)
        self.assertEqual(result["flops"], 960)
        self.assertEqual(result["flops_last_token_logits"], 960 - 2 * 64)
        self.assertNotIn("time_s", result)  # no rates given: no time claimed


class PublishedQwen3Sizes(unittest.TestCase):
    def test_parameter_counts_match_the_model_card(self):
        # Qwen3-30B-A3B's model card: 30.5B parameters, 3.3B activated.
        counts = roofline.model_parameters(roofline.QWEN3_30B_A3B)
        self.assertAlmostEqual(counts["total"] / 30.5e9, 1.0, delta=0.005)
        self.assertAlmostEqual(counts["active_per_token"] / 3.3e9, 1.0, delta=0.02)

    def test_preset_file_gives_the_same_shape(self):
        with open(os.path.join(REPO_ROOT, "configs", "presets", "qwen3-30b-a3b.json")) as f:
            shape = roofline.shape_from_hf_config(json.load(f)["config"])
        self.assertEqual(shape, roofline.QWEN3_30B_A3B)

    def test_large_batch_reads_every_expert_once(self):
        step = roofline.decode_step(roofline.QWEN3_30B_A3B, batch=100000, context=0)
        all_experts = 48 * 128 * 3 * 2048 * 768 * 2
        self.assertAlmostEqual(step["expert_weight_bytes"], all_experts, delta=1e-6 * all_experts)


class ExpectedDistinctExperts(unittest.TestCase):
    def test_limits(self):
        self.assertEqual(roofline.expected_distinct_experts(128, 8, 0), 0.0)
        self.assertAlmostEqual(roofline.expected_distinct_experts(128, 8, 1), 8.0, places=12)
        self.assertAlmostEqual(roofline.expected_distinct_experts(128, 128, 5), 128.0, places=12)
        values = [roofline.expected_distinct_experts(128, 8, b) for b in range(1, 200)]
        self.assertTrue(all(a < b for a, b in zip(values, values[1:])))
        self.assertLess(values[-1], 128.0)

    def test_against_sampling(self):
        # Monte Carlo with a fresh seed (printed on failure): within 5 standard errors of the formula.
        seed = random.SystemRandom().randrange(2**32)
        rng = random.Random(seed)
        experts, top_k, tokens, trials = 128, 8, 16, 4000
        counts = [len({e for _ in range(tokens) for e in rng.sample(range(experts), top_k)}) for _ in range(trials)]
        mean = sum(counts) / trials
        std = (sum((c - mean) ** 2 for c in counts) / (trials - 1)) ** 0.5
        expected = roofline.expected_distinct_experts(experts, top_k, tokens)
        self.assertLess(abs(mean - expected), 5 * std / trials**0.5, f"seed {seed}: mean {mean}, formula {expected}")

    def test_rejects_bad_shapes(self):
        with self.assertRaises(ValueError):
            roofline.MoeShape(hidden=4, moe_intermediate=2, experts=4, top_k=5, layers=1, heads=2, kv_heads=1,
                              head_dim=2, vocab=8)
        with self.assertRaises(ValueError):
            roofline.decode_step(TINY, batch=0, context=3)


class CommandLine(unittest.TestCase):
    def test_rates_come_from_baselines_output(self):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write('{"name": "env", "device": "x"}\nnot json: a log line\n')
            f.write('{"name": "gemm_bf16", "tflop_per_s": 0.000352}\n')
            f.write('{"name": "read_bandwidth_sum", "gb_per_s": 0.448}\n')
            path = f.name
        try:
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roofline.py")
            out = subprocess.run([sys.executable, script, "--layers", "1", "--batch", "2", "--context", "3",
                                  "--from-baselines", path], check=True, capture_output=True, text=True).stdout
        finally:
            os.unlink(path)
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["name"] for r in records], ["roofline_shape", "roofline_decode_step"])
        self.assertEqual(records[0]["bandwidth_gbs"], 0.448)
        self.assertEqual(records[0]["gemm_tflops"], 0.000352)
        step = records[1]
        expected = roofline.decode_step(roofline.MoeShape(**{**roofline.QWEN3_30B_A3B.__dict__, "layers": 1}),
                                        2, 3, 0.448, 0.000352)
        self.assertEqual(step["bytes"], expected["bytes"])
        self.assertEqual(step["tokens_per_s"], expected["tokens_per_s"])


if __name__ == "__main__":
    unittest.main()
