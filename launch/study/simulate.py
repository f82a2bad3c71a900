#!/usr/bin/env python3
"""Cost model of one MoE layer and one decode step on a cluster (issue 9's simulator).

One MoE layer on N ranks (G a node), T tokens a rank, E experts top-k, S expert slots a rank:
  compute   a rank's R rows (placement imbalance + routing spread) over its S experts cost what one
            device's whole layer costs at the same rows per expert, scaled by S / E:
                x = R * E / (S * k) one-device tokens;  compute(R) = (S / E) * t1(x) * shape ratio,
            t1 a measured one-device layer curve (log-log interpolation; linear in tokens past its ends):
            the batched curve where R reaches the device's batched-FFN threshold (not in decode graphs),
            else the streaming curve. The layer waits for the slower of the busiest and the least busy
            rank (fewer rows can mean the slower kernels). With N > 1 every received row also costs
            ep_row_overhead_ns (unpacking, grouping, partial sums; fitted).
  dispatch  latency(mode, peers) + max(intra bytes / intra bandwidth, inter bytes / inter bandwidth)
            [+ normal mode: the count exchange (2 latencies + a host read) and packing at pack rate];
            bytes from traffic.py (each token once per destination rank, or per (token, slot) row);
            low-latency mode: fixed blocks of next_pow2(T) records to every peer.
  combine   latency + partial-sum bytes over the same links.
  hierarchical dispatch: one copy per other node over the inter-node link (rail peer), then forwarding
            inside the node; latencies add, the two bandwidth terms overlap (pipelined chunks) or add.
  host exchange (epic's MPI path, Device.host_exchange): stage by stage (host_exchange_stages): each
            stage a blocking all-to-all, metadata its own collective before the rows; flat = metadata,
            rows, rows back; hierarchical = across, inside, experts, inside, across, one after the other;
            a node's link shared by its ranks, TCP framing counted (Cluster.inter_payload_fraction).
  overlap   two micro-batches on two streams (_two_batch_overlap): counts + read + pack + d0 + max(C, d1)
            + max(C, c0) + c1, C = half the rows' expert phase x (1 + overlap_compute_slowdown).
One decode step of B sequences a rank: dense(B) + layers x the MoE layer in the decode mode, dense(B)
the measured one-device step less its MoE layers (scaled by the dense weights' bytes for other shapes,
plus KV reads for a longer context).

Importable (moe_layer, decode_step, Cluster, Device) and a CLI:
  python3 launch/study/simulate.py --calibration launch/study/calibration/h200.json \
      --shape configs/presets/qwen3-30b-a3b.json --ranks 16 --ranks-per-node 8 --tokens-per-rank 4096
  python3 launch/study/simulate.py ... --decode --batch 256
"""

import argparse
import dataclasses
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import roofline  # noqa: E402  (MoeShape, shape_from_hf_config)
import traffic  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


class Curve:
    """y(x) through measured points: log-log linear between them, proportional to x past either end
    (work-proportional: a layer of twice the tokens past the last measured size takes twice the time)."""

    def __init__(self, xs, ys, name="curve"):
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"{name}: needs as many x as y values, at least one")
        pairs = sorted(zip(xs, ys))
        if any(x <= 0 or y <= 0 for x, y in pairs) or len({x for x, _ in pairs}) != len(pairs):
            raise ValueError(f"{name}: x and y must be positive and the x distinct")
        self.xs = [float(x) for x, _ in pairs]
        self.ys = [float(y) for _, y in pairs]
        self.name = name

    def __call__(self, x):
        if x <= 0:
            return 0.0
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0] * x / xs[0]
        if x >= xs[-1]:
            return ys[-1] * x / xs[-1]
        for i in range(1, len(xs)):
            if x <= xs[i]:
                t = math.log(x / xs[i - 1]) / math.log(xs[i] / xs[i - 1])
                return math.exp(math.log(ys[i - 1]) + t * math.log(ys[i] / ys[i - 1]))
        raise AssertionError("unreachable")


@dataclasses.dataclass
class Latency:
    """Microseconds one exchange waits before bytes move: base + per_peer x peers (+ inter_extra when a
    peer is on another node)."""
    base_us: float
    per_peer_us: float

    def us(self, intra_peers, inter_peers=0, inter_extra_us=0.0):
        peers = intra_peers + inter_peers
        if peers <= 0:
            return 0.0
        return self.base_us + self.per_peer_us * peers + (inter_extra_us if inter_peers > 0 else 0.0)


@dataclasses.dataclass
class Device:
    """A calibrated device and its links (calibrate.load_device builds one from a calibration file)."""
    name: str
    reference_shape: object  # roofline.MoeShape the curves were measured at
    layer_curve: Curve  # one device, one MoE layer: tokens -> ms (the streaming kernels, and decode graphs)
    latency: dict  # mode -> Latency ("normal", "low-latency", "graph", ...)
    intra_gbs: object  # GB/s per rank and direction within a node (times its efficiency), or {node ranks: GB/s}
    dispatch_element_bytes: int = 2
    combine_element_bytes: int = 4
    record_overhead_bytes: int = 0
    granularity: str = "rank"  # "rank" or "slot"
    count_host_read_us: float = 0.0
    pack_gbs: float = 0.0  # 0: no packing term
    batched_curve: object = None  # Curve of the layer where a rank's rows reach batched_from_rows
    batched_from_rows: int = 0  # expert rows from which the FFN runs as batched GEMMs (0: never)
    ep_row_overhead_ns: float = 0.0  # per received row on an expert-parallel rank
    hierarchical_pipelined: bool = True  # the two stages' transfers overlap (chunked) or run one after the other
    # epic's host (MPI) exchange (worker/expert_parallel_moe.cpp, expert_parallel_hierarchical.cpp): every
    # stage is its own blocking all-to-all over the world, metadata first (its own collective), then rows;
    # the hierarchical scheme's four stages (six collectives) run one after the other (host_exchange_stages()).
    host_exchange: bool = False
    overlap_compute_slowdown: float = 0.0  # two-batch overlap: each half's expert phase runs this much slower
    cores: int = 0  # CPU devices: cores a node (ranks x threads beyond it time-share); 0: a GPU
    threads_per_rank: int = 1
    decode_dense_curve: object = None  # batch -> ms of a decode step outside the MoE layers (reference shape)
    decode_context_tokens: float = 0.0  # the context the decode curve was measured at
    read_gbs: float = 0.0  # device memory read rate (KV term)
    memory_bytes: float = 0.0
    notes: dict = dataclasses.field(default_factory=dict)

    def intra_bandwidth(self, ranks_per_node):
        """GB/s a rank moves inside its node: a number, or {ranks: GB/s} measured at some node sizes (the
        largest size not above this one, else the smallest)."""
        if not isinstance(self.intra_gbs, dict):
            return self.intra_gbs
        keys = sorted(self.intra_gbs)
        below = [k for k in keys if k <= ranks_per_node]
        return self.intra_gbs[below[-1] if below else keys[0]]


@dataclasses.dataclass
class Cluster:
    ranks: int
    ranks_per_node: int
    inter_gbs: float = 0.0  # per rank, per direction, between nodes (times its efficiency); 0: one node only
    inter_extra_latency_us: float = 0.0
    one_host: bool = False  # emulated nodes: every rank shares one machine's cores
    inter_payload_fraction: float = 1.0  # payload bytes per byte the inter-node link counts (framing, ACKs)

    def __post_init__(self):
        if self.ranks < 1 or self.ranks_per_node < 1:
            raise ValueError(f"Cluster: ranks and ranks_per_node must be >= 1, got {self.ranks}, {self.ranks_per_node}")
        self.ranks_per_node = min(self.ranks_per_node, self.ranks)
        if self.ranks % self.ranks_per_node:
            raise ValueError(f"Cluster: {self.ranks} ranks are not whole nodes of {self.ranks_per_node}")
        if self.nodes > 1 and self.inter_gbs <= 0:
            raise ValueError(f"Cluster: {self.nodes} nodes need an inter-node bandwidth (inter_gbs)")

    @property
    def nodes(self):
        return self.ranks // self.ranks_per_node


def shape_from_preset(path):
    """roofline.MoeShape of a preset file (configs/presets/*.json, or any file with a "config" object) or
    of a config.json."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return roofline.shape_from_hf_config(data.get("config", data))


def expert_parameters(shape):
    return 3 * shape.hidden * shape.moe_intermediate


def dense_bytes_per_step(shape):
    """Bytes of weights a decode step reads outside the experts: attention, router, norms, lm_head."""
    attention = 2 * shape.hidden * shape.heads * shape.head_dim + 2 * shape.hidden * shape.kv_heads * shape.head_dim
    per_layer = attention + shape.experts * shape.hidden + 2 * shape.hidden + 2 * shape.head_dim
    return (shape.layers * per_layer + shape.vocab * shape.hidden) * shape.weight_bytes


def kv_bytes_per_token(shape):
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.kv_bytes


def next_pow2(value):
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


# epic's host exchange metadata (worker/expert_parallel_moe.cpp and expert_parallel_hierarchical.cpp):
# flat: one int32 expert id a row; hierarchical across: [token, per slot (rank, expert, weight)] int32s a
# record; inside: [record, per slot (expert, weight)] int32s a record.
def host_meta_bytes(top_k):
    return {"flat": 4, "across": 4 * (1 + 3 * top_k), "inside": 4 * (1 + 2 * top_k)}


def tcp_payload_fraction(mtu=1500):
    """Payload bytes per byte a Linux tc shaper counts on an Ethernet-framed TCP link carrying the same bytes
    both ways (an all-to-all): a full segment carries MTU - 20 (IP) - 20 (TCP) - 12 (timestamps option) bytes
    in an MTU + 14 byte frame, and every second segment of the other direction's flow is acknowledged by a
    66-byte frame (14 + 20 + 32, delayed ACKs) sharing this direction. MTU 1500: 2896 / 3094 = 0.936."""
    mss = mtu - 20 - 20 - 12
    return 2 * mss / (2 * (mtu + 14) + (14 + 20 + 32))


def _bandwidth_ms(byte_count, gbs):
    if byte_count <= 0:
        return 0.0
    if gbs <= 0:
        raise ValueError("a link with bytes to move has no bandwidth")
    return byte_count / (gbs * 1e9) * 1e3


def oversubscription(device, cluster):
    """CPU ranks beyond the node's cores time-share them; 1 for GPUs."""
    if device.cores <= 0:
        return 1.0
    ranks_sharing = cluster.ranks if cluster.one_host else cluster.ranks_per_node
    return max(1.0, ranks_sharing * device.threads_per_rank / device.cores)


# What each exchange mode is made of: whose latency, fixed-size blocks or only the rows used, whether the
# batched-FFN path can run (not inside decode graphs), and the count exchange (with the host's read).
MODES = {
    "normal": dict(latency="normal", blocks=False, batched=True, counts=True, host_read=True),  # bench-moe today
    "low-latency": dict(latency="low-latency", blocks=True, batched=True, counts=False, host_read=False),
    "graph": dict(latency="graph", blocks=True, batched=False, counts=False, host_read=False),  # decode today
    "graph-rows": dict(latency="graph", blocks=False, batched=False, counts=False, host_read=False),
    # The normal mode's bytes and count exchange with calls issued from the device (graph latency, no host
    # read): what a prefill-size exchange costs once the host is out of the loop.
    "device": dict(latency="graph", blocks=False, batched=True, counts=True, host_read=False),
}


def moe_layer(shape, device, cluster, tokens_per_rank, load=None, slots=None, mode="normal", overlap=False,
              dispatch="flat", pipelined=None, token_traffic=None):
    """Predicted time of one MoE layer call (the slowest rank), ms, with its parts and the bytes each rank
    moves. mode: a key of MODES."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
    spec = MODES[mode]
    if spec["latency"] not in device.latency and cluster.ranks > 1:
        raise ValueError(f"device {device.name} has no latency figures for mode '{mode}' "
                         f"(has {', '.join(device.latency)})")
    if dispatch not in ("flat", "hierarchical"):
        raise ValueError(f"dispatch must be flat or hierarchical, got {dispatch}")
    if pipelined is None:
        pipelined = device.hierarchical_pipelined
    N, G, T = cluster.ranks, cluster.ranks_per_node, tokens_per_rank
    E, k = shape.experts, shape.top_k
    tt = token_traffic or traffic.layer_traffic(E, k, N, G, load, slots)
    busiest = traffic.busiest_rank_rows(tt, T, k, N)
    least = traffic.least_busy_rank_rows(tt, T, k, N)
    S = tt.experts_per_rank
    ratio = expert_parameters(shape) / expert_parameters(device.reference_shape)
    scale = ratio * oversubscription(device, cluster)
    def rank_compute(rows):
        batched = (spec["batched"] and device.batched_curve is not None and device.batched_from_rows > 0 and
                   rows >= device.batched_from_rows)
        curve = device.batched_curve if batched else device.layer_curve
        ms = (S / E) * curve(rows * E / (S * k)) * scale if S > 0 else 0.0
        return ms + (device.ep_row_overhead_ns * rows * 1e-6 * scale if N > 1 else 0.0)

    compute = max(rank_compute(busiest), rank_compute(least))
    out = {"ranks": N, "nodes": cluster.nodes, "tokens_per_rank": T, "experts_per_rank": S,
           "busiest_rows": busiest, "least_busy_rows": least, "rows_mean": T * k,
           "imbalance": busiest / (T * k) if T > 0 else 1.0, "mode": mode, "dispatch": dispatch}
    if N == 1:
        out.update(compute_ms=compute, dispatch_ms=0.0, combine_ms=0.0, layer_ms=compute, intra_bytes=0.0,
                   inter_bytes=0.0)
        return out

    record_d = shape.hidden * device.dispatch_element_bytes + device.record_overhead_bytes
    record_c = shape.hidden * device.combine_element_bytes
    fixed_blocks = spec["blocks"]
    latency = device.latency[spec["latency"]]
    intra_gbs = device.intra_bandwidth(G)
    inter_gbs = cluster.inter_gbs * cluster.inter_payload_fraction  # payload GB/s a rank gets across
    stages = None
    if device.host_exchange and not fixed_blocks:
        stages = host_exchange_stages(shape, device, cluster, T, tt, dispatch)
        rows_intra, rows_inter = stages["rows_intra"], stages["rows_inter"]
        lat_ms = latency.us(G - 1, N - G, cluster.inter_extra_latency_us) * 1e-3
        dispatch_ms = sum(st["ms"] for st in stages["stages"] if st["phase"] == "dispatch")
        combine_ms = sum(st["ms"] for st in stages["stages"] if st["phase"] == "combine")
        if spec["host_read"]:
            dispatch_ms += device.count_host_read_us * 1e-3
        if device.pack_gbs > 0:
            dispatch_ms += _bandwidth_ms((rows_intra + rows_inter) * record_d, device.pack_gbs)
    else:
        if dispatch == "flat" or cluster.nodes == 1:
            if fixed_blocks:
                capacity = next_pow2(T)
                rows_intra, rows_inter = capacity * (G - 1), capacity * (N - G)
            elif device.granularity == "rank":
                rows_intra, rows_inter = T * tt.ranks_same_node, T * tt.ranks_other_nodes
            else:
                rows_intra, rows_inter = T * tt.slots_same_node, T * tt.slots_other_nodes
            lat_ms = latency.us(G - 1, N - G, cluster.inter_extra_latency_us) * 1e-3
            d_bw = max(_bandwidth_ms(rows_intra * record_d, intra_gbs), _bandwidth_ms(rows_inter * record_d, inter_gbs))
            c_bw = max(_bandwidth_ms(rows_intra * record_c, intra_gbs), _bandwidth_ms(rows_inter * record_c, inter_gbs))
        else:
            nodes = cluster.nodes
            if fixed_blocks:
                capacity = next_pow2(T)
                rows_inter = capacity * (nodes - 1)
                rows_intra = capacity * (G - 1) * 2  # own tokens, then the forwarded ones
            else:
                rows_inter = T * tt.nodes_other
                rows_intra = T * tt.ranks_same_node + T * tt.nodes_other * tt.forwards_per_node
            lat_ms = (latency.us(0, nodes - 1, cluster.inter_extra_latency_us) + latency.us(G - 1)) * 1e-3
            terms_d = (_bandwidth_ms(rows_inter * record_d, inter_gbs), _bandwidth_ms(rows_intra * record_d, intra_gbs))
            terms_c = (_bandwidth_ms(rows_inter * record_c, inter_gbs), _bandwidth_ms(rows_intra * record_c, intra_gbs))
            d_bw = max(terms_d) if pipelined else sum(terms_d)
            c_bw = max(terms_c) if pipelined else sum(terms_c)
        # Fixed (latency, count exchange, host read) and byte-proportional (bandwidth, packing) parts.
        fixed_d, fixed_c, pack_ms = lat_ms, lat_ms, 0.0
        if spec["counts"]:
            # The count exchange (an exchange each way, and the host's read of the counts) and the packing.
            fixed_d += 2 * lat_ms + (device.count_host_read_us * 1e-3 if spec["host_read"] else 0.0)
            if device.pack_gbs > 0:
                pack_ms = _bandwidth_ms((rows_intra + rows_inter) * record_d, device.pack_gbs)
        dispatch_ms, combine_ms = fixed_d + pack_ms + d_bw, fixed_c + c_bw
    if overlap:
        if not spec["counts"] or stages is not None:
            raise ValueError("overlap is an option of the device exchange's normal (and device) modes")
        layer, overlap_parts = _two_batch_overlap(device, lat_ms, spec, pack_ms, d_bw, c_bw, rank_compute, busiest,
                                                  least)
        out.update(overlap_parts)
    else:
        layer = compute + dispatch_ms + combine_ms
    out.update(compute_ms=compute, dispatch_ms=dispatch_ms, combine_ms=combine_ms, layer_ms=layer,
               latency_ms=lat_ms, intra_bytes=rows_intra * (record_d + record_c),
               inter_bytes=rows_inter * (record_d + record_c))
    if stages is not None:
        out["stages"] = stages["stages"]
        out["intra_bytes"], out["inter_bytes"] = stages["intra_bytes"], stages["inter_bytes"]
    return out


def _two_batch_overlap(device, lat_ms, spec, pack_ms, d_bw, c_bw, rank_compute, busiest, least):
    """Two-batch overlap as epic's device exchange runs it (worker/device_expert_parallel_overlap.cpp): the
    two halves' count exchanges (each 2 latencies) and one host read of both, both packs, then on the
    communication stream dispatch 0, dispatch 1, combine 0, combine 1 (each one latency + half the bytes),
    on the compute stream expert phase 0 once dispatch 0 is in and expert phase 1 once dispatch 1 is in
    and phase 0 is done:
        layer = counts + read + pack + d0 + max(C, d1) + max(C, c0) + c1,
    C = a half's expert phase (half the busiest / least busy rank's rows) x (1 + overlap_compute_slowdown)."""
    counts_ms = 2 * 2 * lat_ms + (device.count_host_read_us * 1e-3 if spec["host_read"] else 0.0)
    half_compute = max(rank_compute(busiest / 2), rank_compute(least / 2)) * (1 + device.overlap_compute_slowdown)
    d_half, c_half = lat_ms + d_bw / 2, lat_ms + c_bw / 2
    layer = counts_ms + pack_ms + d_half + max(half_compute, d_half) + max(half_compute, c_half) + c_half
    return layer, {"overlap_half_compute_ms": half_compute, "overlap_counts_ms": counts_ms, "overlap_dispatch_half_ms": d_half,
                   "overlap_combine_half_ms": c_half}


def host_exchange_stages(shape, device, cluster, T, tt, dispatch):
    """epic's host (MPI) exchange, stage by stage, for one rank: each stage a blocking all-to-all over the
    world, its metadata a collective of its own before the rows (host_meta_bytes); a stage's bytes to
    other nodes cross the node's link at this rank's share of it (Cluster.inter_gbs, times
    inter_payload_fraction), its bytes inside the node go at the device's intra rate; a stage that sends to
    both at once (flat) waits for the slower. Each collective costs the device's normal-mode latency over
    the peers it talks to (+ inter_extra_latency_us when they are on another node).
      flat:          dispatch = metadata + rows (to every rank at once); combine = rows back.
      hierarchical:  dispatch = across (metadata, rows: one record per (token, other node) to that node's
                     gateway) then inside (metadata, rows: each record the gateway holds, and the rank's own
                     tokens, to the ranks of the node hosting its slots); combine = inside (partials to the
                     gateway) then across (one summed row per record back)."""
    N, G, k = cluster.ranks, cluster.ranks_per_node, shape.top_k
    nodes = cluster.nodes
    lat = device.latency["normal"]
    row_d = shape.hidden * device.dispatch_element_bytes + device.record_overhead_bytes
    row_c = shape.hidden * device.combine_element_bytes
    meta = host_meta_bytes(k)
    intra_gbs = device.intra_bandwidth(G)
    inter_gbs = cluster.inter_gbs * cluster.inter_payload_fraction if nodes > 1 else math.inf

    def stage(name, phase, intra_bytes, inter_bytes, collectives, intra_peers, inter_peers):
        lat_ms = collectives * lat.us(intra_peers, inter_peers, cluster.inter_extra_latency_us) * 1e-3
        ms = lat_ms + max(_bandwidth_ms(intra_bytes, intra_gbs),
                          _bandwidth_ms(inter_bytes, inter_gbs) if inter_bytes > 0 else 0.0)
        return {"name": name, "phase": phase, "ms": ms, "latency_ms": lat_ms, "intra_bytes": intra_bytes,
                "inter_bytes": inter_bytes}

    if dispatch == "flat" or nodes == 1:
        if device.granularity == "rank":
            rows_intra, rows_inter = T * tt.ranks_same_node, T * tt.ranks_other_nodes
        else:
            rows_intra, rows_inter = T * tt.slots_same_node, T * tt.slots_other_nodes
        m = meta["flat"]
        stages = [stage("metadata", "dispatch", rows_intra * m, rows_inter * m, 1, G - 1, N - G),
                  stage("rows", "dispatch", rows_intra * row_d, rows_inter * row_d, 1, G - 1, N - G),
                  stage("rows back", "combine", rows_intra * row_c, rows_inter * row_c, 1, G - 1, N - G)]
    else:
        rows_inter = T * tt.nodes_other  # records to other nodes' gateways
        rows_intra = T * tt.ranks_same_node + T * tt.nodes_other * tt.forwards_per_node  # forwarded inside
        stages = [stage("across metadata", "dispatch", 0.0, rows_inter * meta["across"], 1, 0, nodes - 1),
                  stage("across rows", "dispatch", 0.0, rows_inter * row_d, 1, 0, nodes - 1),
                  stage("inside metadata", "dispatch", rows_intra * meta["inside"], 0.0, 1, G - 1, 0),
                  stage("inside rows", "dispatch", rows_intra * row_d, 0.0, 1, G - 1, 0),
                  stage("inside partials", "combine", rows_intra * row_c, 0.0, 1, G - 1, 0),
                  stage("across sums", "combine", 0.0, rows_inter * row_c, 1, 0, nodes - 1)]
    return {"stages": stages, "rows_intra": rows_intra, "rows_inter": rows_inter,
            "intra_bytes": sum(st["intra_bytes"] for st in stages),
            "inter_bytes": sum(st["inter_bytes"] for st in stages)}


def dense_step_ms(shape, device, batch, context_tokens=None):
    """A decode step's time outside the MoE layers: the measured curve, scaled by the dense bytes of this
    shape against the reference, plus the KV reads of a longer context than the curve's."""
    if device.decode_dense_curve is None:
        raise ValueError(f"device {device.name} has no decode figures")
    scale = dense_bytes_per_step(shape) / dense_bytes_per_step(device.reference_shape)
    ms = device.decode_dense_curve(batch) * scale
    if context_tokens is not None and context_tokens > device.decode_context_tokens:
        if device.read_gbs <= 0:
            raise ValueError(f"device {device.name}: a longer context needs read_gbs")
        extra = batch * (context_tokens - device.decode_context_tokens) * kv_bytes_per_token(shape)
        ms += _bandwidth_ms(extra, device.read_gbs)
    return ms


def decode_step(shape, device, cluster, batch_per_rank, load=None, slots=None, mode="graph", dispatch="flat",
                context_tokens=None, token_traffic=None):
    """One decode step of batch_per_rank sequences on every rank: ms a step and tokens/s of the cluster."""
    layer = moe_layer(shape, device, cluster, batch_per_rank, load, slots, mode=mode, dispatch=dispatch,
                      token_traffic=token_traffic)
    dense = dense_step_ms(shape, device, batch_per_rank, context_tokens)
    step = dense + shape.layers * layer["layer_ms"]
    return {"ms_per_step": step, "dense_ms": dense, "moe_layer_ms": layer["layer_ms"], "layer": layer,
            "tokens_per_s": cluster.ranks * batch_per_rank / (step * 1e-3)}


def memory_per_rank(shape, slots_per_layer, batch, context_tokens):
    """Bytes a rank holds: dense weights, its expert slots in every layer, and its sequences' KV cache."""
    dense = dense_bytes_per_step(shape) + shape.vocab * shape.hidden * shape.weight_bytes  # + embedding
    experts = shape.layers * slots_per_layer * expert_parameters(shape) * shape.weight_bytes
    kv = batch * context_tokens * kv_bytes_per_token(shape)
    return {"dense": dense, "experts": experts, "kv": kv, "total": dense + experts + kv}


def main(argv=None):
    import calibrate  # the calibration file's fits (imported here: calibrate imports this module)
    import placement_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--shape", default=os.path.join(REPO_ROOT, "configs", "presets", "qwen3-30b-a3b.json"))
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--inter-gbs", type=float, help="per GPU between nodes (default: the calibration's)")
    parser.add_argument("--tokens-per-rank", type=int, default=128)
    parser.add_argument("--mode", default="normal")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--dispatch", default="flat", choices=["flat", "hierarchical"])
    parser.add_argument("--slots", type=int)
    parser.add_argument("--load-profile", help="epic-load-profile-v1 (its first layer is used)")
    parser.add_argument("--zipf", type=float, help="a synthetic skew instead: loads ~ 1 / rank^zipf")
    parser.add_argument("--decode", action="store_true", help="a decode step of --batch sequences a rank")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=float, help="decode context tokens (default: the calibration's)")
    args = parser.parse_args(argv)
    device, report = calibrate.load_device(args.calibration)
    shape = shape_from_preset(args.shape)
    cluster = calibrate.cluster_for(report, args.ranks, args.ranks_per_node, args.inter_gbs)
    load = None
    if args.load_profile:
        layers = placement_model.read_load_profile(args.load_profile)
        load = layers[min(layers)]
    elif args.zipf is not None:
        load = placement_model.zipf_profile(shape.experts, args.zipf)[0]
    if args.decode:
        result = decode_step(shape, device, cluster, args.batch, load, args.slots,
                             mode="graph" if args.mode == "normal" else args.mode, dispatch=args.dispatch,
                             context_tokens=args.context)
    else:
        result = moe_layer(shape, device, cluster, args.tokens_per_rank, load, args.slots, args.mode, args.overlap,
                           args.dispatch)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
