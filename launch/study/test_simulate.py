"""Checks of the simulator's arithmetic on cases worked by hand (each comment gives the working), the
placement mirror against `epic plan` (skipped without an epic binary), the sampled traffic against the
closed form, and the calibration's fits. Run: python3 -m unittest discover -s launch/study"""

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import calibrate  # noqa: E402
import placement_model  # noqa: E402
import simulate  # noqa: E402
import traffic  # noqa: E402
import roofline  # noqa: E402  (simulate put launch/bench on the path)

EPIC = os.environ.get("EPIC_BINARY") or os.path.join(simulate.REPO_ROOT, "build", "epic")
HAVE_EPIC = os.path.isfile(EPIC) and os.access(EPIC, os.X_OK)

# hidden 8, expert intermediate 2, 4 experts top-2, 1 layer.
SMALL = roofline.MoeShape(hidden=8, moe_intermediate=2, experts=4, top_k=2, layers=1, heads=1, kv_heads=1, head_dim=8,
                          vocab=8)


def small_device(**changes):
    """A layer that costs 1 ms a token (t1(x) = x), 100 us a collective, 1 MB/s links."""
    device = simulate.Device(name="hand", reference_shape=SMALL, layer_curve=simulate.Curve([1, 100], [1, 100]),
                             latency={"normal": simulate.Latency(100.0, 0.0), "graph": simulate.Latency(100.0, 0.0)},
                             intra_gbs=0.001, dispatch_element_bytes=2, combine_element_bytes=4)
    for key, value in changes.items():
        setattr(device, key, value)
    return device


class CurveAndLatency(unittest.TestCase):
    def test_curve(self):
        curve = simulate.Curve([1, 4], [1, 16])  # y = x^2 between the points
        self.assertAlmostEqual(curve(2), 4.0, places=12)  # log-log: a straight line of slope 2
        self.assertAlmostEqual(curve(8), 32.0, places=12)  # past the end: proportional to x (16 x 8/4)
        self.assertAlmostEqual(curve(0.5), 0.5, places=12)  # below the start: proportional (1 x 0.5/1)
        with self.assertRaises(ValueError):
            simulate.Curve([1, 1], [1, 2])

    def test_latency(self):
        # 10 + 2 x (3 + 4) peers + 5 for leaving the node = 29 us; no peers, no wait.
        self.assertEqual(simulate.Latency(10, 2).us(3, 4, inter_extra_us=5), 29)
        self.assertEqual(simulate.Latency(10, 2).us(0, 0), 0)

    def test_two_point_latency_and_least_squares(self):
        latency = calibrate.two_point_latency({1: 45.0, 3: 120.0})  # (120 - 45) / 2 = 37.5 a peer, 7.5 base
        self.assertAlmostEqual(latency.per_peer_us, 37.5, places=9)
        self.assertAlmostEqual(latency.base_us, 7.5, places=9)
        self.assertEqual([round(v, 9) for v in calibrate.least_squares([[1, 0], [1, 1], [1, 2]], [1, 3, 5])], [1, 2])


class TokenTraffic(unittest.TestCase):
    def test_two_ranks_on_two_nodes(self):
        # 4 experts, top-2, 2 ranks of 2 experts, one rank a node. A token misses a given rank with
        # C(2,2)/C(4,2) = 1/6, so it reaches the other rank (and node) with 5/6; it sends 2 x 1/2 = 1 slot there.
        # One rank's rows from a token: hypergeometric variance 2 x 1/2 x 1/2 x (4-2)/(4-1) = 1/3.
        t = traffic.uniform_traffic(4, 2, 2, 1)
        self.assertAlmostEqual(t.ranks_other_nodes, 5 / 6, places=12)
        self.assertAlmostEqual(t.nodes_other, 5 / 6, places=12)
        self.assertAlmostEqual(t.slots_other_nodes, 1.0, places=12)
        self.assertEqual(t.ranks_same_node, 0.0)
        self.assertAlmostEqual(t.rows_variance_per_token, 1 / 3, places=12)

    def test_hierarchical_counts(self):
        # 4 ranks of 1 expert, 2 a node. Rank hit: 1 - C(3,2)/C(4,2) = 1/2; node hit: 1 - C(2,2)/C(4,2) = 5/6.
        # Same node: 1 other rank x 1/2; other nodes: 2 ranks x 1/2 = 1 (flat copies), 1 node x 5/6
        # (hierarchical copies); forwards at the receiving node: (2 - 1) x (1/2) / (5/6) = 0.6.
        t = traffic.uniform_traffic(4, 2, 4, 2)
        self.assertAlmostEqual(t.ranks_same_node, 0.5, places=12)
        self.assertAlmostEqual(t.ranks_other_nodes, 1.0, places=12)
        self.assertAlmostEqual(t.nodes_other, 5 / 6, places=12)
        self.assertAlmostEqual(t.forwards_per_node, 0.6, places=12)
        self.assertAlmostEqual(t.slots_other_nodes, 1.0, places=12)  # 2 slots x 2/4 of the ranks

    def test_sampled_matches_closed_form(self):
        # Qwen3-30B-A3B's routing shape on 16 ranks (2 nodes): 4000 sampled tokens. The per-token counts
        # are bounded by 8, so a standard error is below 8 / sqrt(4000) = 0.13; allow 0.1 absolute.
        exact = traffic.uniform_traffic(128, 8, 16, 8)
        sampled = traffic.sampled_traffic([1.0] * 128, 8, 16, 8, samples=4000, seed=3)
        for field in ("ranks_same_node", "ranks_other_nodes", "nodes_other", "slots_other_nodes", "forwards_per_node"):
            self.assertAlmostEqual(getattr(sampled, field), getattr(exact, field), delta=0.1, msg=field)

    def test_busiest_rank(self):
        # 2 ranks, 10 tokens a rank, variance 1/3 a token: spread sqrt(2 x 10 / 3) = 2.582; Blom's expected max
        # of 2 normals inv_cdf(1.625 / 2.25) = 0.5894; busiest = 20 + 1.522, least busy = 20 - 1.522.
        t = traffic.uniform_traffic(4, 2, 2, 2)
        z = 0.5894
        self.assertAlmostEqual(traffic.expected_max_normal(2), z, delta=1e-4)
        self.assertAlmostEqual(traffic.busiest_rank_rows(t, 10, 2, 2), 20 + z * math.sqrt(20 / 3), delta=1e-3)
        self.assertAlmostEqual(traffic.least_busy_rank_rows(t, 10, 2, 2), 20 - z * math.sqrt(20 / 3), delta=1e-3)
        self.assertEqual(traffic.expected_max_normal(1), 0.0)


class MoeLayerByHand(unittest.TestCase):
    def test_one_rank_is_the_curve(self):
        result = simulate.moe_layer(SMALL, small_device(), simulate.Cluster(1, 1), 10)
        self.assertAlmostEqual(result["layer_ms"], 10.0, places=12)  # t1(10 tokens) = 10 ms, no exchange

    def test_two_ranks_normal_mode(self):
        # 2 ranks on one node, 10 tokens a rank. Busiest rank: 21.522 rows (test_busiest_rank) over its 2 of 4
        # experts: x = 21.522 x 4 / (2 x 2) = 21.522 tokens, compute = 2/4 x 21.522 = 10.761 ms.
        # Dispatch: 10 x 5/6 = 8.333 token copies to the other rank, each 8 x 2 B = 16 B: 133.3 B at 1 MB/s
        # = 0.1333 ms, + 0.1 ms latency, + the count exchange 2 x 0.1 ms = 0.4333 ms.
        # Combine: 8.333 partial sums of 8 x 4 B = 266.7 B: 0.2667 ms + 0.1 ms = 0.3667 ms.
        result = simulate.moe_layer(SMALL, small_device(), simulate.Cluster(2, 2), 10)
        z = traffic.expected_max_normal(2)
        compute = 0.5 * (20 + z * math.sqrt(20 / 3))
        self.assertAlmostEqual(result["compute_ms"], compute, places=9)
        self.assertAlmostEqual(result["dispatch_ms"], 0.1 + 0.2 + 10 * 5 / 6 * 16 / 1e6 * 1e3, places=9)
        self.assertAlmostEqual(result["combine_ms"], 0.1 + 10 * 5 / 6 * 32 / 1e6 * 1e3, places=9)
        self.assertAlmostEqual(result["layer_ms"], compute + 0.4333333333 + 0.3666666667, places=8)
        # Overlap (two micro-batches of 5 tokens): counts of both halves 4 x 0.1 ms (no host read, no packing);
        # on the comm stream d0 = d1 = 0.1 + 0.1333 / 2 = 0.1667 ms, c0 = c1 = 0.1 + 0.2667 / 2 = 0.2333 ms; a
        # half's expert phase C = 1.5 x (half the busiest rank's rows: 0.5 x 21.522 / 2 = 5.380 ms) = 8.071 ms.
        # layer = 0.4 + d0 + max(C, d1) + max(C, c0) + c1 = 0.4 + 0.1667 + 2 C + 0.2333.
        overlapped = simulate.moe_layer(SMALL, small_device(overlap_compute_slowdown=0.5), simulate.Cluster(2, 2), 10,
                                        overlap=True)
        half = 1.5 * compute / 2
        self.assertAlmostEqual(overlapped["overlap_half_compute_ms"], half, places=9)
        self.assertAlmostEqual(overlapped["layer_ms"], 0.4 + (0.1 + 0.4 / 6) + 2 * half + (0.1 + 0.8 / 6), places=8)
        # A link so slow that the transfers are longer than a half's compute: 100x the bytes' time.
        slow = simulate.moe_layer(SMALL, small_device(intra_gbs=0.00001), simulate.Cluster(2, 2), 10, overlap=True)
        d_half, c_half = 0.1 + 13.333333333 / 2, 0.1 + 26.666666667 / 2
        self.assertAlmostEqual(slow["layer_ms"], 0.4 + d_half + max(compute / 2, d_half) + max(compute / 2, c_half) +
                               c_half, places=6)

    def test_fixed_blocks_and_row_overhead(self):
        # Graph mode: blocks of next_pow2(10) = 16 records to the one peer, no count exchange:
        # dispatch 0.1 + 16 x 16 B / 1 MB/s = 0.356 ms; combine 0.1 + 16 x 32 B = 0.612 ms.
        # A 1000 ns row overhead adds 21.522 rows x 1 us = 0.0215 ms to compute.
        result = simulate.moe_layer(SMALL, small_device(ep_row_overhead_ns=1000.0), simulate.Cluster(2, 2), 10,
                                    mode="graph")
        self.assertAlmostEqual(result["dispatch_ms"], 0.1 + 0.256, places=9)
        self.assertAlmostEqual(result["combine_ms"], 0.1 + 0.512, places=9)
        busiest = 20 + traffic.expected_max_normal(2) * math.sqrt(20 / 3)
        self.assertAlmostEqual(result["compute_ms"], 0.5 * busiest + busiest * 1e-3, places=9)

    def test_hierarchical_against_flat(self):
        # 4 ranks of 1 expert, 2 a node, 60 tokens a rank; intra 1 MB/s, inter 0.5 MB/s, latency 100 us.
        # Flat: NVLink 60 x 0.5 = 30 copies, inter 60 x 1 = 60 copies of 16 B: max(0.48, 1.92) ms + 0.1.
        # Hierarchical: inter 60 x 5/6 = 50 copies (1.6 ms), intra 60 x (0.5 + 5/6 x 0.6) = 60 copies (0.96 ms);
        # pipelined: max = 1.6 ms, latencies 0.1 (to the other node) + 0.1 (inside) = 0.2.
        cluster = simulate.Cluster(4, 2, inter_gbs=0.0005)
        device = small_device()
        flat = simulate.moe_layer(SMALL, device, cluster, 60, mode="graph-rows", dispatch="flat")
        hier = simulate.moe_layer(SMALL, device, cluster, 60, mode="graph-rows", dispatch="hierarchical")
        self.assertAlmostEqual(flat["dispatch_ms"], 0.1 + 1.92, places=9)
        self.assertAlmostEqual(hier["dispatch_ms"], 0.2 + 1.6, places=9)
        self.assertAlmostEqual(hier["inter_bytes"], 50 * (16 + 32), places=9)
        self.assertAlmostEqual(flat["inter_bytes"], 60 * (16 + 32), places=9)
        unpiped = simulate.moe_layer(SMALL, device, cluster, 60, mode="graph-rows", dispatch="hierarchical",
                                     pipelined=False)
        self.assertAlmostEqual(unpiped["dispatch_ms"], 0.2 + 1.6 + 0.96, places=9)

    def test_host_exchange_stages(self):
        # epic's MPI host exchange, fp32 rows of 8 = 32 B, 4 ranks of 1 expert, 2 a node, 60 tokens a rank,
        # latency 100 us a collective, intra 1 MB/s, inter 0.5 MB/s a rank. Metadata (top-2): flat 4 B a row,
        # across 4 x (1 + 3 x 2) = 28 B a record, inside 4 x (1 + 2 x 2) = 20 B a record.
        # Hierarchical: 60 x 5/6 = 50 records across, 60 x (0.5 + 5/6 x 0.6) = 60 records inside:
        #   across metadata 0.1 + 50 x 28 B / 0.5 MB/s = 2.9 ms; across rows 0.1 + 50 x 32 / 0.5 MB/s = 3.3;
        #   inside metadata 0.1 + 60 x 20 B / 1 MB/s = 1.3; inside rows 0.1 + 60 x 32 / 1 MB/s = 2.02
        #   dispatch = 9.52 ms; combine = inside partials 2.02 + across sums 3.3 = 5.32 ms.
        # Flat: 30 rows inside, 60 across, one collective each at once (the slower side):
        #   metadata 0.1 + max(30 x 4 / 1 MB/s, 60 x 4 / 0.5 MB/s) = 0.58; rows 0.1 + max(0.96, 3.84) = 3.94;
        #   combine 0.1 + 3.84 = 3.94.
        device = small_device(host_exchange=True, granularity="slot", dispatch_element_bytes=4)
        cluster = simulate.Cluster(4, 2, inter_gbs=0.0005)
        hier = simulate.moe_layer(SMALL, device, cluster, 60, dispatch="hierarchical")
        self.assertEqual([st["name"] for st in hier["stages"]],
                         ["across metadata", "across rows", "inside metadata", "inside rows", "inside partials",
                          "across sums"])
        self.assertAlmostEqual(hier["dispatch_ms"], 2.9 + 3.3 + 1.3 + 2.02, places=9)
        self.assertAlmostEqual(hier["combine_ms"], 2.02 + 3.3, places=9)
        self.assertAlmostEqual(hier["inter_bytes"], 50 * (28 + 32 + 32), places=9)
        flat = simulate.moe_layer(SMALL, device, cluster, 60, dispatch="flat")
        self.assertAlmostEqual(flat["dispatch_ms"], 0.58 + 3.94, places=9)
        self.assertAlmostEqual(flat["combine_ms"], 3.94, places=9)
        # Half the link's bytes are payload (framing): every across term takes twice as long.
        cluster.inter_payload_fraction = 0.5
        framed = simulate.moe_layer(SMALL, device, cluster, 60, dispatch="hierarchical")
        self.assertAlmostEqual(framed["dispatch_ms"], 0.1 + 5.6 + 0.1 + 6.4 + 1.3 + 2.02, places=9)
        self.assertAlmostEqual(framed["combine_ms"], 2.02 + 0.1 + 6.4, places=9)

    def test_tcp_payload_fraction(self):
        # MTU 1500: 1448 payload bytes a 1514-byte frame, and a 66-byte ACK a 2 segments of the other way.
        self.assertAlmostEqual(simulate.tcp_payload_fraction(1500), 2 * 1448 / (2 * 1514 + 66), places=12)
        self.assertAlmostEqual(simulate.tcp_payload_fraction(9000), 2 * 8948 / (2 * 9014 + 66), places=12)

    def test_batched_threshold_picks_the_slower_rank(self):
        # Batched curve 10x cheaper, from 20 rows: the busiest rank (21.5 rows) is batched (1.08 ms), the least
        # busy (18.5) is not (9.24 ms): the layer waits for the least busy one.
        device = small_device(batched_curve=simulate.Curve([1, 100], [0.1, 10]), batched_from_rows=20)
        result = simulate.moe_layer(SMALL, device, simulate.Cluster(2, 2), 10, mode="normal")
        least = 20 - traffic.expected_max_normal(2) * math.sqrt(20 / 3)
        self.assertAlmostEqual(result["compute_ms"], 0.5 * least, places=9)

    def test_shapes_scale_by_expert_size(self):
        bigger = roofline.MoeShape(**{**SMALL.__dict__, "hidden": 16, "moe_intermediate": 4})  # 4x the expert
        one = simulate.moe_layer(bigger, small_device(), simulate.Cluster(1, 1), 10)
        self.assertAlmostEqual(one["layer_ms"], 40.0, places=9)

    def test_memory(self):
        # Qwen3-30B-A3B on one GPU: 48 x 128 experts x 3 x 2048 x 768 x 2 B = 57,982,058,496 B of experts.
        shape = roofline.QWEN3_30B_A3B
        self.assertEqual(simulate.memory_per_rank(shape, 128, 0, 0)["experts"], 57982058496)
        # KV: 2 x 48 layers x 4 heads x 128 x 2 B = 98,304 B a token.
        self.assertEqual(simulate.kv_bytes_per_token(shape), 98304)


class Placement(unittest.TestCase):
    def test_hand_packing(self):
        # loads 4 3 2 1, 2 workers x 2 slots: 4 -> w0, 3 -> w1, 2 -> w1 (3 < 4), 1 -> w0: 5 and 5.
        plan = placement_model.plan_layer([4, 3, 2, 1], 2, 2)
        self.assertEqual(plan.worker_experts, [[0, 3], [1, 2]])
        self.assertEqual(plan.worker_load, [5.0, 5.0])
        # 3 slots: 2 spare go to expert 0 (4/1) then expert 1 (3/1 > 4/2): weights 2,2,2(e2),1.5,1.5,1.
        # e0 -> w0, e0 -> w1, e2 -> w0 (tie, lower index), e1 -> w1, e1 -> w0 (w1 holds it), e3 -> w1.
        plan = placement_model.plan_layer([4, 3, 2, 1], 2, 3)
        self.assertEqual(plan.worker_experts, [[0, 1, 2], [0, 1, 3]])
        self.assertEqual(plan.worker_load, [5.5, 4.5])

    @unittest.skipUnless(HAVE_EPIC, f"no epic binary at {EPIC}: the placement mirror is not compared with epic plan")
    def test_matches_epic_plan(self):
        # Random profiles (seed printed) over the tiny model's 8 experts: the same experts on the same workers
        # and the same expected loads as epic plan prints.
        seed = random.SystemRandom().randrange(2**32)
        rng = random.Random(seed)
        model = os.environ.get("EPIC_TINY_MODEL")
        with tempfile.TemporaryDirectory() as folder:
            if not model:
                model = os.path.join(folder, "tiny")
                subprocess.run([EPIC, "make-model", "--preset", os.path.join(simulate.REPO_ROOT, "configs", "presets",
                                                                             "tiny.json"), "--out", model],
                               check=True, capture_output=True, timeout=120)
            with open(os.path.join(model, "config.json")) as f:
                config = json.load(f)
            moe_layers = [i for i in range(config["num_hidden_layers"]) if i not in config.get("mlp_only_layers", [])]
            for trial in range(6):
                profile = {str(layer): [float(rng.choice([0, 1, 2, 3, 5, 8, 13])) for _ in range(8)]
                           for layer in moe_layers}
                path = os.path.join(folder, f"profile{trial}.json")
                with open(path, "w") as f:
                    json.dump({"format": "epic-load-profile-v1", "layers": profile}, f)
                workers = rng.choice([2, 3, 5])
                slots = math.ceil(8 / workers) + rng.choice([0, 1, 2])
                done = subprocess.run([EPIC, "plan", "--model", model, "--workers", str(workers), "--slots", str(slots),
                                       "--load-profile", path], capture_output=True, text=True, timeout=60)
                self.assertEqual(done.returncode, 0, done.stderr)
                for layer in json.loads(done.stdout)["layers"]:
                    mine = placement_model.plan_layer(profile[str(layer["layer"])], workers, slots)
                    self.assertEqual(mine.worker_experts, layer["workers"], f"seed {seed}, trial {trial}")
                    for a, b in zip(mine.worker_load, layer["worker_load"]):
                        self.assertAlmostEqual(a, b, places=9, msg=f"seed {seed}, trial {trial}")


class CommittedCalibration(unittest.TestCase):
    def test_curves_pass_through_their_points(self):
        # The EP1 points are the curve's own inputs: the model must give them back exactly (1e-9 relative).
        path = os.path.join(HERE, "calibration", "h200.json")
        device, report = calibrate.load_device(path)
        checked = 0
        for point in report["points"]:
            if report["roles"][point["id"]] == "curve":
                _, key, predicted = calibrate.predict(point, device, report)
                self.assertAlmostEqual(predicted / point["measured"][key], 1.0, delta=1e-9, msg=point["id"])
                checked += 1
        self.assertGreaterEqual(checked, 4)

    def test_fits_reproduce_their_inputs(self):
        # The graph latency is solved exactly through the two decode points it is fitted to.
        path = os.path.join(HERE, "calibration", "h200.json")
        device, report = calibrate.load_device(path)
        for point in report["points"]:
            if point["id"] in ("decode-ep2-b64", "decode-ep4-b64"):
                _, key, predicted = calibrate.predict(point, device, report)
                self.assertAlmostEqual(predicted, point["measured"][key], delta=1e-9)


    def test_eager_low_latency_is_floor_plus_graph(self):
        # Nothing is fitted to the eager low-latency points: its latency is the 8-byte floor's (host launch
        # and wait) plus the graph-replayed exchange's.
        device, report = calibrate.load_device(os.path.join(HERE, "calibration", "h200.json"))
        ll, normal, graph = (device.latency[m] for m in ("low-latency", "normal", "graph"))
        for peers in (1, 3):
            self.assertAlmostEqual(ll.us(peers), normal.us(peers) + graph.us(peers), places=9)
        for pid, role in report["roles"].items():
            if pid.endswith("-ll"):
                self.assertEqual(role, "held-out", pid)


if __name__ == "__main__":
    unittest.main()
