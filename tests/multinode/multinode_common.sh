# Sourced by the multinode tests: the reference run (tests/launch/reference_run.sh) and one prologue.
# multinode_setup NAME EPIC_BINARY NODES SUBNET: sets epic_binary (absolute), num_nodes, subnet,
# ranks_per_node (2), nodes_script, and the name log and fail print; exits 77 with the reason where this
# machine cannot make emulated nodes (ctest counts the test as skipped).
multinode_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/launch/reference_run.sh
source "$multinode_here/../launch/reference_run.sh"

multinode_setup() {
  multinode_name="$1"
  epic_binary="$(realpath "${2:?usage: $1 EPIC_BINARY NODES SUBNET}")"
  num_nodes="${3:?NODES}"
  subnet="${4:?SUBNET (10.X.Y)}"
  ranks_per_node=2
  nodes_script="$multinode_here/emulated_nodes.sh"
  local reason
  if ! reason=$(bash "$nodes_script" check 2>&1); then
    echo "SKIPPED: emulated nodes need network namespaces: $reason"
    exit 77
  fi
}
log() { echo "${multinode_name:-multinode}: $*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}
