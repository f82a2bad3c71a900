"""Expert placement as coordinator/placement.cpp plans it (replica counts, then greedy largest-first
packing), load profiles as `epic run --load-profile-out` writes them (epic-load-profile-v1), and synthetic
skewed profiles for models we have no routing record of. Used by the simulator's traffic model.
"""

import dataclasses
import heapq
import json
import math
import random

PROFILE_FORMAT = "epic-load-profile-v1"


@dataclasses.dataclass
class LayerPlan:
    slots: int
    worker_experts: list  # worker -> expert ids hosted
    expert_workers: list  # expert -> workers holding a replica
    expert_load: list
    worker_load: list  # expected load per worker (a replica carries load / replicas)

    @property
    def max_over_mean(self):
        mean = sum(self.worker_load) / len(self.worker_load)
        return max(self.worker_load) / mean if mean > 0 else 1.0


def replica_counts(load, num_workers, slots):
    """One replica per expert, then each spare slot to the expert with the most load per replica (ties:
    lower id) that is not yet on every worker (placement.cpp replica_counts)."""
    experts = len(load)
    replicas = [1] * experts
    spare = num_workers * slots - experts
    # Heap of (-load per replica, expert): the same choice as the C++ linear scan, faster for many ranks.
    heap = [(-load[e], e) for e in range(experts) if num_workers > 1]
    heapq.heapify(heap)
    while spare > 0 and heap:
        _, expert = heapq.heappop(heap)
        replicas[expert] += 1
        spare -= 1
        if replicas[expert] < num_workers:
            heapq.heappush(heap, (-load[expert] / replicas[expert], expert))
    return replicas


def pack_replicas(load, replicas, num_workers, slots):
    """Largest-first packing (placement.cpp pack_replicas): each replica, heaviest first (ties lower expert
    id), to the least-loaded worker (ties lower index) with a free slot that does not hold the expert."""
    experts = len(load)
    items = sorted(((load[e] / replicas[e], e) for e in range(experts) for _ in range(replicas[e])),
                   key=lambda item: (-item[0], item[1]))
    hosted = [[] for _ in range(num_workers)]
    holds = [set() for _ in range(num_workers)]
    worker_load = [0.0] * num_workers
    heap = [(0.0, w) for w in range(num_workers)]

    def weight(expert):
        return load[expert] / replicas[expert]

    def add(worker, expert):
        hosted[worker].append(expert)
        holds[worker].add(expert)
        worker_load[worker] += weight(expert)

    for item_weight, expert in items:
        skipped = []
        chosen = -1
        while heap:
            current, worker = heapq.heappop(heap)
            if current != worker_load[worker] or len(hosted[worker]) >= slots:
                continue  # stale entry, or full for good
            if expert in holds[worker]:
                skipped.append((current, worker))
                continue
            chosen = worker
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        if chosen >= 0:
            add(chosen, expert)
            if len(hosted[chosen]) < slots:
                heapq.heappush(heap, (worker_load[chosen], chosen))
            continue
        # Every worker with a free slot holds this expert: move a light expert from a full worker that
        # lacks it to the open worker, and take its slot (placement.cpp's repair, linear as there).
        open_worker = next((w for w in range(num_workers) if len(hosted[w]) < slots), -1)
        full = -1
        for w in range(num_workers):
            if expert not in holds[w] and (full < 0 or worker_load[w] < worker_load[full]):
                full = w
        if open_worker < 0 or full < 0:
            raise ValueError(f"placement: no worker can take a replica of expert {expert}")
        moved = min((e for e in hosted[full] if e not in holds[open_worker]), key=lambda e: (weight(e), e),
                    default=-1)
        if moved < 0:
            raise ValueError("placement: packing repair found no expert to move")
        hosted[full].remove(moved)
        holds[full].discard(moved)
        worker_load[full] -= weight(moved)
        add(open_worker, moved)
        add(full, expert)
        heap = [(worker_load[w], w) for w in range(num_workers) if len(hosted[w]) < slots]
        heapq.heapify(heap)
    return hosted, worker_load


def plan_layer(load, num_workers, slots=None):
    """The placement of one layer: slots per worker default ceil(experts / workers), at most experts."""
    experts = len(load)
    if num_workers < 1 or experts < 1:
        raise ValueError(f"plan_layer: need workers >= 1 and experts >= 1, got {num_workers}, {experts}")
    minimum = math.ceil(experts / num_workers)
    slots = minimum if slots is None else slots
    if slots < minimum:
        raise ValueError(f"plan_layer: {slots} slots per worker cannot hold {experts} experts on {num_workers} "
                         f"workers (at least {minimum})")
    slots = min(slots, experts)
    if sum(load) <= 0:
        load = [1.0] * experts  # uniform where the profile has nothing (as the planner does)
    load = [float(v) for v in load]
    replicas = replica_counts(load, num_workers, slots)
    hosted, worker_load = pack_replicas(load, replicas, num_workers, slots)
    expert_workers = [[] for _ in range(experts)]
    for worker, ids in enumerate(hosted):
        for expert in ids:
            expert_workers[expert].append(worker)
    return LayerPlan(slots=slots, worker_experts=[sorted(ids) for ids in hosted], expert_workers=expert_workers,
                     expert_load=load, worker_load=worker_load)


def read_load_profile(path):
    """{layer: [load per expert]} from an epic-load-profile-v1 file; ValueError naming the problem."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: not a load profile (format {PROFILE_FORMAT}; write one with "
                         "`epic run --load-profile-out`)")
    layers = {}
    for key, counts in data.get("layers", {}).items():
        if not key.isdigit() or not isinstance(counts, list) or not counts or \
                not all(isinstance(c, (int, float)) and c >= 0 and math.isfinite(c) for c in counts):
            raise ValueError(f"{path}: layer '{key}' must map a layer index to non-negative counts")
        layers[int(key)] = [float(c) for c in counts]
    if not layers:
        raise ValueError(f"{path}: no layers")
    return layers


def zipf_profile(experts, exponent, num_layers=1, seed=1):
    """A skewed profile: expert loads proportional to 1 / rank^exponent, the ranks shuffled per layer
    (seeded). exponent 0 is uniform."""
    rng = random.Random(seed)
    layers = {}
    for layer in range(num_layers):
        loads = [1.0 / (position + 1) ** exponent for position in range(experts)]
        rng.shuffle(loads)
        total = sum(loads)
        layers[layer] = [v * experts / total for v in loads]  # mean 1
    return layers


def max_over_mean(values):
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0
