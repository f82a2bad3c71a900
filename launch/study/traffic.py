"""Where one MoE layer's token rows go on a cluster: per token, how many other ranks (same node / other
nodes) and other nodes receive it, how many (token, slot) rows cross, and how unevenly the ranks' expert
rows fall. Uniform routing without replicas is counted in closed form; a load profile or replicas are
sampled (a fixed seed, so results are reproducible).

Dispatch granularity (what one "row" is on the wire):
  rank  each token once per destination rank holding any of its slots (epic's NCCL path);
  slot  one row per (token, slot) on another rank (epic's MPI host path).
Hierarchical dispatch: a token crosses to each other node once (to the rank of its own local index
there, which forwards it inside the node); combine reduces inside the node first, so one partial sum per
(token, node) crosses back.
"""

import bisect
import dataclasses
import itertools
import math
import random
import statistics

import placement_model


@dataclasses.dataclass
class TokenTraffic:
    """Per-token expectations (multiply by tokens per rank for one rank's totals)."""
    ranks_same_node: float  # other ranks on the sender's node holding >= 1 of its slots
    ranks_other_nodes: float  # ranks on other nodes holding >= 1 of its slots
    nodes_other: float  # other nodes holding >= 1 of its slots
    slots_same_node: float  # (token, slot) rows to other ranks of the sender's node
    slots_other_nodes: float  # (token, slot) rows to ranks of other nodes
    forwards_per_node: float  # hierarchical: ranks a receiving node's rail rank forwards to, per node hit
    max_share_over_mean: float  # expected rows of the busiest rank / mean (the placement's imbalance)
    min_share_over_mean: float  # the same for the least busy rank
    rows_variance_per_token: float  # variance of one rank's rows contributed by one token (for the spread)
    experts_per_rank: float  # slots hosted per rank (experts + replicas)


def _comb_ratio(total, removed, k):
    """C(total - removed, k) / C(total, k): the chance that k distinct picks all miss `removed` items."""
    if removed <= 0:
        return 1.0
    if total - removed < k:
        return 0.0
    ratio = 1.0
    for i in range(k):
        ratio *= (total - removed - i) / (total - i)
    return ratio


def uniform_traffic(experts, top_k, ranks, ranks_per_node):
    """Closed form: every token picks top_k distinct experts uniformly; each rank hosts experts / ranks of
    them (no replicas), ranks_per_node ranks a node."""
    if experts % ranks:
        raise ValueError(f"uniform_traffic: {experts} experts do not split evenly over {ranks} ranks (use sampled)")
    if ranks % ranks_per_node and ranks > ranks_per_node:
        raise ValueError(f"uniform_traffic: {ranks} ranks are not whole nodes of {ranks_per_node}")
    per_rank = experts // ranks
    ranks_per_node = min(ranks_per_node, ranks)
    nodes = ranks // ranks_per_node
    rank_hit = 1.0 - _comb_ratio(experts, per_rank, top_k)
    node_hit = 1.0 - _comb_ratio(experts, per_rank * ranks_per_node, top_k)
    slot_share = top_k / ranks  # expected slots a given rank gets from one token
    # A rank's rows from one token are hypergeometric (top_k draws, per_rank successes of experts).
    p = per_rank / experts
    variance = top_k * p * (1 - p) * (experts - top_k) / (experts - 1) if experts > 1 else 0.0
    # Given a node is hit, its rail rank forwards to the other hit ranks there: (G - 1) x P(rank hit | node hit).
    forwards = (ranks_per_node - 1) * rank_hit / node_hit if node_hit > 0 and nodes > 1 else 0.0
    return TokenTraffic(ranks_same_node=(ranks_per_node - 1) * rank_hit,
                        ranks_other_nodes=(ranks - ranks_per_node) * rank_hit,
                        nodes_other=(nodes - 1) * node_hit,
                        slots_same_node=(ranks_per_node - 1) * slot_share,
                        slots_other_nodes=(ranks - ranks_per_node) * slot_share,
                        forwards_per_node=forwards,
                        max_share_over_mean=1.0,
                        min_share_over_mean=1.0,
                        rows_variance_per_token=variance,
                        experts_per_rank=per_rank)


def _weighted_sample_without_replacement(rng, cumulative, k):
    """k distinct indices, each draw proportional to the weights not yet drawn: draws from the whole
    distribution with repeats rejected, which is the same law as sequential sampling of what is left."""
    total = cumulative[-1]
    chosen = []
    while len(chosen) < k:
        pick = bisect.bisect_right(cumulative, rng.random() * total)
        pick = min(pick, len(cumulative) - 1)
        if pick not in chosen:
            chosen.append(pick)
    return chosen


def sampled_traffic(load, top_k, ranks, ranks_per_node, slots=None, samples=4000, seed=7):
    """Per-token expectations by sampling tokens that pick top_k experts with chances following `load`
    (one layer's loads), placed by placement_model.plan_layer (replicas chosen per occurrence uniformly,
    as epic's rotation does on average); each sampled token comes from rank (index mod ranks)."""
    experts = len(load)
    ranks_per_node = min(ranks_per_node, ranks)
    plan = placement_model.plan_layer(load, ranks, slots)
    rng = random.Random(seed)
    if sum(load) <= 0 or sum(1 for v in load if v > 0) < top_k:
        raise ValueError(f"sampled_traffic: the load needs at least top_k={top_k} experts with load > 0")
    cumulative = list(itertools.accumulate(float(v) for v in load))
    node_of = [r // ranks_per_node for r in range(ranks)]
    totals = dict(same=0.0, other=0.0, nodes=0.0, slot_same=0.0, slot_other=0.0, forwards=0.0, node_hits=0)
    for index in range(samples):
        source = index % ranks
        picks = _weighted_sample_without_replacement(rng, cumulative, top_k)
        dest = [plan.expert_workers[e][rng.randrange(len(plan.expert_workers[e]))] for e in picks]
        dest_ranks = set(dest) - {source}
        same = {r for r in dest_ranks if node_of[r] == node_of[source]}
        totals["same"] += len(same)
        totals["other"] += len(dest_ranks) - len(same)
        for r in dest:
            if r != source:
                totals["slot_same" if node_of[r] == node_of[source] else "slot_other"] += 1
        by_node = {}
        for r in set(dest):
            if node_of[r] != node_of[source]:
                by_node.setdefault(node_of[r], set()).add(r)
        totals["nodes"] += len(by_node)
        local_index = source % ranks_per_node
        for node, hit in by_node.items():
            rail = node * ranks_per_node + local_index
            totals["forwards"] += len(hit - {rail})
            totals["node_hits"] += 1
    # Rows per rank: expected share from the plan's loads; per-token variance of the busiest rank's rows.
    total_load = sum(plan.worker_load)
    shares = [w / total_load * top_k for w in plan.worker_load] if total_load > 0 else [top_k / ranks] * ranks
    busiest = max(shares)
    p = min(busiest / top_k, 1.0)
    variance = top_k * p * (1 - p) * (experts - top_k) / (experts - 1) if experts > 1 else 0.0
    return TokenTraffic(ranks_same_node=totals["same"] / samples,
                        ranks_other_nodes=totals["other"] / samples,
                        nodes_other=totals["nodes"] / samples,
                        slots_same_node=totals["slot_same"] / samples,
                        slots_other_nodes=totals["slot_other"] / samples,
                        forwards_per_node=totals["forwards"] / totals["node_hits"] if totals["node_hits"] else 0.0,
                        max_share_over_mean=busiest / (top_k / ranks),
                        min_share_over_mean=min(shares) / (top_k / ranks),
                        rows_variance_per_token=variance,
                        experts_per_rank=plan.slots)


def expected_max_normal(count):
    """E[max of `count` iid standard normals] by Blom's approximation (0 for one)."""
    if count <= 1:
        return 0.0
    return statistics.NormalDist().inv_cdf((count - 0.375) / (count + 0.25))


def busiest_rank_rows(traffic, tokens_per_rank, top_k, ranks):
    """Expected rows of the busiest rank: the placement's imbalance plus the spread of random routing
    (a normal approximation over ranks x tokens_per_rank tokens)."""
    mean = tokens_per_rank * top_k  # rows a rank gets on average (every row lands somewhere)
    spread = math.sqrt(ranks * tokens_per_rank * traffic.rows_variance_per_token)
    return mean * traffic.max_share_over_mean + expected_max_normal(ranks) * spread


def least_busy_rank_rows(traffic, tokens_per_rank, top_k, ranks):
    """Expected rows of the least busy rank (it matters where fewer rows take a slower kernel path)."""
    mean = tokens_per_rank * top_k
    spread = math.sqrt(ranks * tokens_per_rank * traffic.rows_variance_per_token)
    return max(0.0, mean * traffic.min_share_over_mean - expected_max_normal(ranks) * spread)


def layer_traffic(experts, top_k, ranks, ranks_per_node, load=None, slots=None, samples=4000, seed=7):
    """Closed form where it applies (uniform routing, no spare slots, experts divisible by ranks), else sampled."""
    uniform = load is None or len(set(load)) <= 1
    default_slots = math.ceil(experts / ranks)
    if uniform and experts % ranks == 0 and (slots is None or slots == default_slots):
        return uniform_traffic(experts, top_k, ranks, ranks_per_node)
    return sampled_traffic(load if load is not None else [1.0] * experts, top_k, ranks, ranks_per_node,
                           slots, samples, seed)
