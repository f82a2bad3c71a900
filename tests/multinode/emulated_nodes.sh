#!/usr/bin/env bash
# Emulated nodes on one machine (issue 9): each "node" is a network namespace with its own address and
# host name, joined to the others by veth pairs into one bridge; nothing routes out of the test network
# (a private /24, no default route). OpenMPI runs across them over TCP, started by mpirun through an rsh
# agent (this script's `agent`) that enters the node's namespace instead of ssh. Needs root (ip netns).
#
#   emulated_nodes.sh up DIR NODES [SUBNET]   make nodes node1..NODES (SUBNET: the /24's first three
#                                             octets, default 10.231.77; node K is SUBNET.K); writes
#                                             DIR/hostfile (a line per node: its name, slots=SLOTS_PER_NODE,
#                                             default 2), DIR/agent, DIR/mpirun_args (one per line)
#   emulated_nodes.sh down DIR                remove everything `up DIR` made (by the names it recorded)
#   emulated_nodes.sh exec DIR NODE CMD...    run CMD on a node (its namespace and host name)
#   emulated_nodes.sh shape DIR NODE RATE     shape NODE's link to RATE (tc tbf, e.g. 1gbit), both ways
#   emulated_nodes.sh check                   exit 0 when this machine can make emulated nodes
#
# Names are derived from DIR's inode, so two fixtures never collide and `down` finds its own.
set -euo pipefail

die() { echo "emulated_nodes: $*" >&2; exit 1; }

check() {
  [ "$(id -u)" = 0 ] || { echo "needs root (ip netns, veth, bridge)"; return 1; }
  command -v ip > /dev/null || { echo "needs iproute2 (ip)"; return 1; }
  command -v unshare > /dev/null || { echo "needs unshare (util-linux)"; return 1; }
  local probe="epicprobe$$"
  ip netns add "$probe" 2> /dev/null || { echo "ip netns add fails here (no network namespaces)"; return 1; }
  ip netns del "$probe"
}

# A short tag from DIR (interface names are at most 15 characters).
tag_of() { printf 'e%x' "$(( $(stat -c %i "$1") % 65536 ))"; }

up() {
  local dir=$1 nodes=$2 subnet=${3:-10.231.77}
  [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 16 ] || die "NODES must be 1..16, got '$nodes'"
  [[ "$subnet" =~ ^10\.[0-9]+\.[0-9]+$ ]] || die "SUBNET must be 10.X.Y (a private /24), got '$subnet'"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local tag; tag=$(tag_of "$dir")
  local bridge="${tag}br"
  : > "$dir/made"
  ip link add "$bridge" type bridge
  echo "link $bridge" >> "$dir/made"
  ip addr add "$subnet.254/24" dev "$bridge"  # mpirun (outside every node) reaches the daemons here
  ip link set "$bridge" up
  : > "$dir/hostfile"
  : > "$dir/nodes"
  local k
  for k in $(seq 1 "$nodes"); do
    local ns="${tag}n$k" outside="${tag}v$k" inside="${tag}i$k" address="$subnet.$k"
    ip netns add "$ns"
    echo "netns $ns" >> "$dir/made"
    ip link add "$outside" type veth peer name "$inside"
    echo "link $outside" >> "$dir/made"
    ip link set "$inside" netns "$ns"
    ip link set "$outside" master "$bridge"
    ip link set "$outside" up
    ip netns exec "$ns" ip addr add "$address/24" dev "$inside"
    ip netns exec "$ns" ip link set "$inside" up
    ip netns exec "$ns" ip link set lo up
    echo "node$k slots=${SLOTS_PER_NODE:-2}" >> "$dir/hostfile"
    echo "node$k $ns $address $outside" >> "$dir/nodes"
  done
  # The rsh agent: mpirun calls it as `agent [options] HOST COMMAND` (COMMAND one shell string, as for
  # ssh); it runs COMMAND in HOST's namespace under the node's own host name. The names need no resolver:
  # mpirun hands them to the agent, and the daemons call back to mpirun's address on the bridge.
  cat > "$dir/agent" <<AGENT
#!/usr/bin/env bash
while [[ "\${1:-}" == -* ]]; do shift; done
host=\$1; shift
line=\$(grep -E "^\$host " "$dir/nodes") || { echo "emulated node agent: unknown host \$host" >&2; exit 1; }
read -r name ns _ _ <<< "\$line"
exec ip netns exec "\$ns" unshare --uts /bin/sh -c 'hostname "\$0"; exec /bin/sh -c "\$1"' "\$name" "\$*"
AGENT
  chmod +x "$dir/agent"
  # What mpirun needs to run across the nodes (TCP between them, shared memory inside one).
  printf '%s\n' --hostfile "$dir/hostfile" --mca plm_rsh_agent "$dir/agent" \
    --mca oob_tcp_if_include "$subnet.0/24" --mca btl_tcp_if_include "$subnet.0/24" \
    --mca btl self,vader,tcp --mca pml ob1 > "$dir/mpirun_args"
}

down() {
  local dir=$1
  [ -f "$dir/made" ] || return 0
  local kind name
  # Namespaces first (their processes' links go with them), then the links left in this namespace.
  while read -r kind name; do
    if [ "$kind" = netns ]; then
      ip netns pids "$name" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
      ip netns del "$name" 2> /dev/null || true
    fi
  done < "$dir/made"
  while read -r kind name; do
    [ "$kind" = link ] && { ip link del "$name" 2> /dev/null || true; }
  done < "$dir/made"
  rm -f "$dir/made"
}

node_field() {  # node_field DIR NODE COLUMN
  local line
  line=$(grep -E "^$2 " "$1/nodes") || die "no node $2 in $1/nodes"
  echo "$line" | awk "{print \$$3}"
}

case "${1:-}" in
  up) [ $# -ge 3 ] || die "usage: up DIR NODES [SUBNET]"; up "$2" "$3" "${4:-}" ;;
  down) [ $# -eq 2 ] || die "usage: down DIR"; down "$2" ;;
  exec)
    [ $# -ge 4 ] || die "usage: exec DIR NODE CMD..."
    dir=$2 node=$3; shift 3
    exec ip netns exec "$(node_field "$dir" "$node" 2)" unshare --uts /bin/sh -c 'hostname "$0"; exec "$@"' "$node" "$@" ;;
  shape)
    [ $# -eq 4 ] || die "usage: shape DIR NODE RATE"
    outside=$(node_field "$2" "$3" 4) ns=$(node_field "$2" "$3" 2)
    tc qdisc replace dev "$outside" root tbf rate "$4" burst 256kb latency 50ms
    ip netns exec "$ns" tc qdisc replace dev "$(ip netns exec "$ns" ls /sys/class/net | grep -v lo | head -1)" root tbf rate "$4" burst 256kb latency 50ms ;;
  check) check ;;
  *) die "usage: up|down|exec|shape|check (see the header)" ;;
esac
