#!/usr/bin/env bash
# Flat against hierarchical expert-parallel dispatch across emulated nodes with a slow link between them
# (issue 9). Two nodes x 2 ranks (tests/multinode/emulated_nodes.sh: network namespaces; OpenMPI over
# shared memory inside a node and TCP over a veth pair between nodes), one MoE layer of PRESET's shapes
# on the cpu backend (bench-moe, self-checked). First the intra-node rate is measured (2 ranks on one
# node: their exchange bytes over their dispatch + combine time); then each node's veth is shaped with
# `tc tbf` to that rate / RATIO for each RATIO, and both schemes run in the same shaping, one after the
# other. Prints a table (and writes OUT_DIR/shaped_nodes.json): per scheme and ratio, the slowest rank's
# dispatch, combine and layer time, and the bytes that crossed between nodes per token; per ratio the
# hierarchical / flat ratios. The layer time includes the expert FFN on the CPU, which a busy machine
# makes noisy: the dispatch + combine time is the figure the schemes differ in.
# Needs root (namespaces, tc). Removes everything it made on every exit path.
#
#   launch/bench/shaped_nodes_bench.sh EPIC_BINARY OUT_DIR [RATIOS (default "10 50")] [PRESET] [TOKENS]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
epic="$(realpath "${1:?usage: shaped_nodes_bench.sh EPIC_BINARY OUT_DIR [RATIOS] [PRESET] [TOKENS]}")"
out_dir="${2:?OUT_DIR}"
ratios="${3:-10 50}"
preset="${4:-qwen3-30b-a3b}"
tokens="${5:-128}"
nodes_script="$repo/tests/multinode/emulated_nodes.sh"
reason=$(bash "$nodes_script" check 2>&1) || { echo "shaped_nodes_bench: cannot make emulated nodes: $reason" >&2; exit 2; }
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/epic-shaped.XXXXXX")"
cleanup() {
  bash "$nodes_script" down "$work/nodes" || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SLOTS_PER_NODE=2 bash "$nodes_script" up "$work/nodes" 2 10.231.81
mapfile -t mpirun_args < "$work/nodes/mpirun_args"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
bench=(bench-moe --preset "$preset" --layers 1 --tokens-per-worker "$tokens" --iterations 3 --warmup 1
       --backend cpu --threads 1 --comm-timeout 600)

run() {  # run NAME RANKS HOSTS [epic args]: bench-moe under mpirun on HOSTS, JSON to $work/NAME.json
  local name=$1 ranks=$2 hosts=$3
  shift 3
  if ! timeout 900 mpirun -np "$ranks" "${mpirun_args[@]}" --host "$hosts" "$epic" "${bench[@]}" "$@" \
    --json "$work/$name.json" > "$work/$name.out" 2> "$work/$name.err"; then
    cat "$work/$name.out" "$work/$name.err" >&2
    echo "shaped_nodes_bench: $name failed" >&2
    exit 1
  fi
}

# The intra-node rate: 2 ranks on node1 (shared memory), their exchange bytes over their exchange time.
run intra 2 node1:2
intra_mbit=$(python3 - "$work/intra.json" << 'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rates = [(w["bytes_sent"] + w["bytes_received"]) / ((w["dispatch_ms"] + w["combine_ms"]) / 1e3)
         for w in r["per_worker"]]
print(int(min(rates) * 8 / 1e6))
PY
)
echo "shaped_nodes_bench: intra-node exchange rate ${intra_mbit} Mbit/s per rank (2 ranks on one node)" >&2

names=()
for ratio in $ratios; do
  rate=$((intra_mbit / ratio))
  [[ $rate -ge 1 ]] || { echo "shaped_nodes_bench: rate for ratio $ratio is below 1 Mbit/s" >&2; exit 1; }
  for node in node1 node2; do bash "$nodes_script" shape "$work/nodes" "$node" "${rate}mbit"; done
  echo "shaped_nodes_bench: ratio $ratio: each node's link shaped to ${rate} Mbit/s each way" >&2
  for scheme in flat hierarchical; do
    run "ratio${ratio}_${scheme}" 4 node1:2,node2:2 --ep-dispatch "$scheme"
    names+=("ratio${ratio}_${scheme}:$ratio:$rate:$scheme")
  done
done

python3 - "$work" "$out_dir/shaped_nodes.json" "$intra_mbit" "$preset" "$tokens" "${names[@]}" << 'PY'
import json, sys
work, out, intra, preset, tokens, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6:]
rows = []
for entry in names:
    name, ratio, rate, scheme = entry.split(":")
    r = json.load(open(f"{work}/{name}.json"))
    workers = r["per_worker"]
    rows.append({
        "ratio": int(ratio), "inter_node_mbit": int(rate), "scheme": scheme,
        "dispatch_ms": max(w["dispatch_ms"] for w in workers),
        "combine_ms": max(w["combine_ms"] for w in workers),
        "layer_ms": max(w["total_ms"] for w in workers),
        "inter_node_bytes_per_token": r["inter_node_bytes_per_token_per_layer"],
        "expected_row_bytes_per_token": r["expected_inter_node_row_bytes_per_token_per_layer"],
        "checked": r["checked"], "shape": r["shape"], "backend": r["backend"],
    })
json.dump({"intra_node_mbit": intra, "preset": preset, "tokens_per_rank": tokens, "nodes": 2, "ranks_per_node": 2,
           "runs": rows}, open(out, "w"), indent=2)
print(f"shaped nodes: 2 nodes x 2 ranks, {preset}, {tokens} tokens/rank, 1 MoE layer, cpu fp32; "
      f"intra-node exchange {intra} Mbit/s per rank")
print("| intra/inter | inter-node link | scheme | dispatch ms | combine ms | layer ms | bytes across nodes / token |")
print("|---|---|---|---|---|---|---|")
for row in rows:
    print(f"| {row['ratio']}x | {row['inter_node_mbit']} Mbit/s | {row['scheme']} | {row['dispatch_ms']:.1f} | "
          f"{row['combine_ms']:.1f} | {row['layer_ms']:.1f} | {row['inter_node_bytes_per_token']:.0f} "
          f"(rows alone expected {row['expected_row_bytes_per_token']:.0f}) |")
for ratio in sorted({row["ratio"] for row in rows}):
    by = {row["scheme"]: row for row in rows if row["ratio"] == ratio}
    if "flat" in by and "hierarchical" in by:
        flat, hier = by["flat"], by["hierarchical"]
        exchange = (hier["dispatch_ms"] + hier["combine_ms"]) / (flat["dispatch_ms"] + flat["combine_ms"])
        print(f"ratio {ratio}x: hierarchical / flat: dispatch + combine {exchange:.2f}, "
              f"layer {hier['layer_ms'] / flat['layer_ms']:.2f}, bytes across nodes "
              f"{hier['inter_node_bytes_per_token'] / max(flat['inter_node_bytes_per_token'], 1):.2f}")
PY
