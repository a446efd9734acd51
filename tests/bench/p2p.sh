#!/usr/bin/env bash
# Peer-to-peer network benchmark (`make bench`, or alone: `tests/bench/run.sh p2p`).
# A benchmark, not a test: it prints figures and records them in docs/BENCHMARKS.md
# (section bench:p2p); it never runs in `make test`.
#
# What it does:
#   1. builds the release binary; starts ONE PostgreSQL server in a temp directory with
#      one database per node (30 embedded clusters would measure PostgreSQL, not the
#      network, and would not fit 2 cores) — every node is still a real `cosmicsync`
#      process with its own shard database (`--shard-url`);
#   2. starts node 0 (the bootstrap node), then nodes 1..N-1 at once, each knowing only
#      node 0, all on 127.0.0.1 with port 0 and `--kad-mode server` (on loopback no
#      AutoNAT verdict can make them servers);
#   3. measures the time from launching node 0 until every node has at least
#      BENCH_P2P_TABLE peers in its Kademlia routing table (polled over the control
#      socket with `cosmicsync network status`);
#   4. runs BENCH_P2P_LOOKUPS DHT peer lookups (`cosmicsync network find-peer`) from
#      random nodes for random other nodes; the time is measured inside the node;
#   5. reads every node's resident memory (VmRSS) and its number of connected peers;
#   6. always stops every node and the PostgreSQL server (trap on exit).
#
# Knobs: BENCH_P2P_NODES=30 BENCH_P2P_TABLE=10 BENCH_P2P_LOOKUPS=200
#        BENCH_DOC=docs/BENCHMARKS.md ("" = do not write) BENCH_BUILD=1

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
source "$BENCH_DIR/lib.sh"

NODES=${BENCH_P2P_NODES:-30}
TABLE=${BENCH_P2P_TABLE:-10}
LOOKUPS=${BENCH_P2P_LOOKUPS:-200}
DOC=${BENCH_DOC-$ROOT/docs/BENCHMARKS.md}
BUILD=${BENCH_BUILD:-1}
CONVERGE_TIMEOUT=${BENCH_P2P_TIMEOUT:-300}
BIN=${BENCH_BIN:-$ROOT/target/release/cosmicsync}
for knob in NODES TABLE LOOKUPS; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || die "BENCH_P2P_* settings must be whole numbers ($knob is '${!knob}')"
done
((NODES >= 2 && TABLE < NODES && LOOKUPS >= 1)) || die "need BENCH_P2P_NODES >= 2 and BENCH_P2P_TABLE < BENCH_P2P_NODES"

ensure_tool jq
PGBIN=$(pg_bin_dir) || die "PostgreSQL binaries not found (run .ci/ensure-postgres)"
if [[ $BUILD != 0 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && "${CARGO:-cargo}" build --release)
fi
[[ -x $BIN ]] || die "$BIN not found"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cosmicsync-p2p-bench.XXXXXX")
chmod 0711 "$WORK"
PG=$WORK/pg
PGPORT=$((20000 + RANDOM % 20000))
PIDS=()

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -f $PG/postmaster.pid ]]; then
        as_pg_owner "$PGBIN/pg_ctl" -D "$PG" stop -m fast -w >/dev/null 2>&1 || true
    fi
    if ((status != 0)) && [[ -f $WORK/n0.log ]]; then
        printf -- '--- last lines of node 0 log ---\n' >&2
        tail -n 20 "$WORK/n0.log" >&2 || true
    fi
    rm -rf -- "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# 1. One PostgreSQL server, one database per node
# ---------------------------------------------------------------------------------------
log "starting PostgreSQL with $NODES databases"
mkdir "$PG"
is_root && chown postgres: "$PG"
as_pg_owner "$PGBIN/initdb" -D "$PG" -A trust -U postgres >/dev/null
as_pg_owner "$PGBIN/pg_ctl" -D "$PG" -l "$PG/server.log" -w \
    -o "-k $PG -p $PGPORT -c listen_addresses='' -c max_connections=$((NODES * 3 + 10))" start >/dev/null
for ((i = 0; i < NODES; i++)); do
    as_pg_owner "$PGBIN/createdb" -h "$PG" -p "$PGPORT" -U postgres "node_$i"
done

# ---------------------------------------------------------------------------------------
# 2. Start the nodes
# ---------------------------------------------------------------------------------------
start_node() { # INDEX ARGS...
    local i=$1
    shift
    mkdir -p "$WORK/n$i"
    node_spawn "$WORK/n$i" "$WORK/n$i.log" --http-addr 127.0.0.1:0 \
        --shard-url "host=$PG port=$PGPORT user=postgres dbname=node_$i" --pool-size 2 \
        --p2p-listen /ip4/127.0.0.1/tcp/0 --p2p-listen /ip4/127.0.0.1/udp/0/quic-v1 --kad-mode server "$@"
    PIDS[i]=$SPAWNED_PID
}
wait_ready() { node_wait_ready "$WORK/n$1" "${PIDS[$1]}" "$WORK/n$1.log"; }
now_ms() { date +%s%3N; }

log "starting $NODES nodes"
T0=$(now_ms)
start_node 0
wait_ready 0
BOOT_ID=$(jq -r .peer_id "$WORK/n0/node.json")
BOOT_ADDR="$(jq -r '.p2p_addrs[] | select(contains("/tcp/"))' "$WORK/n0/node.json" | head -n1)/p2p/$BOOT_ID"
for ((i = 1; i < NODES; i++)); do
    start_node "$i" --bootstrap "$BOOT_ADDR"
done
for ((i = 1; i < NODES; i++)); do
    wait_ready "$i"
done
T_READY=$(now_ms)
PEER_IDS=()
for ((i = 0; i < NODES; i++)); do
    PEER_IDS[i]=$(jq -r .peer_id "$WORK/n$i/node.json")
done

# ---------------------------------------------------------------------------------------
# 3. Until every routing table has TABLE peers
# ---------------------------------------------------------------------------------------
log "waiting until every node has at least $TABLE peers in its routing table"
table_size() { "$BIN" --data-dir "$WORK/n$1" network status 2>/dev/null | jq -r '.network.routing_table_size // 0'; }
deadline=$((SECONDS + CONVERGE_TIMEOUT))
while :; do
    behind=0
    for ((i = 0; i < NODES; i++)); do
        (($(table_size "$i") >= TABLE)) || behind=$((behind + 1))
    done
    ((behind == 0)) && break
    ((SECONDS < deadline)) || die "$behind nodes still have fewer than $TABLE peers after ${CONVERGE_TIMEOUT} s"
    sleep 0.2
done
T_TABLE=$(now_ms)

# ---------------------------------------------------------------------------------------
# 4. DHT lookups
# ---------------------------------------------------------------------------------------
log "running $LOOKUPS DHT peer lookups"
TIMES=$WORK/lookups.txt
: >"$TIMES"
FAILED=0
for ((k = 0; k < LOOKUPS; k++)); do
    from=$((RANDOM % NODES))
    to=$(((from + 1 + RANDOM % (NODES - 1)) % NODES))
    if out=$("$BIN" --data-dir "$WORK/n$from" network find-peer "${PEER_IDS[to]}" --json 2>/dev/null); then
        jq -r .elapsed_ms <<<"$out" >>"$TIMES"
    else
        FAILED=$((FAILED + 1))
    fi
done
percentile() { # P FILE: nearest-rank percentile
    sort -g "$2" | awk -v p="$1" '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } r = int((p / 100) * NR + 0.999999); if (r < 1) r = 1; printf "%.1f", v[r] }'
}
LOOKUP_OK=$(wc -l <"$TIMES")
P50=$(percentile 50 "$TIMES")
P99=$(percentile 99 "$TIMES")

# ---------------------------------------------------------------------------------------
# 5. Memory and peers
# ---------------------------------------------------------------------------------------
RSS_FILE=$WORK/rss.txt
PEERS_FILE=$WORK/peers.txt
: >"$RSS_FILE"
: >"$PEERS_FILE"
for ((i = 0; i < NODES; i++)); do
    rss_kib "${PIDS[i]}" >>"$RSS_FILE"
    "$BIN" --data-dir "$WORK/n$i" network peers --json | jq length >>"$PEERS_FILE"
done
RSS_MED=$(awk '{ printf "%.1f\n", $1 / 1024 }' "$RSS_FILE" >"$WORK/rss_mib.txt" && percentile 50 "$WORK/rss_mib.txt")
RSS_MAX=$(sort -g "$WORK/rss_mib.txt" | tail -n1)
PEERS_MIN=$(sort -g "$PEERS_FILE" | head -n1)
PEERS_MAX=$(sort -g "$PEERS_FILE" | tail -n1)
TABLE_S=$(awk -v a="$T0" -v b="$T_TABLE" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
READY_S=$(awk -v a="$T0" -v b="$T_READY" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
AFTER_S=$(awk -v a="$T_READY" -v b="$T_TABLE" 'BEGIN { printf "%.1f", (b - a) / 1000 }')

machine_facts
CORES=$(nproc)

cat >&2 <<EOF

=== cosmicsync p2p benchmark ($NODES nodes on loopback) ===
start → every node has >= $TABLE peers in its routing table   $TABLE_S s   (all nodes ready after $READY_S s, then $AFTER_S s)
DHT peer lookup ($LOOKUP_OK ok, $FAILED failed)            median $P50 ms   p99 $P99 ms
resident memory per node (VmRSS)                          median $RSS_MED MiB   max $RSS_MAX MiB   with $PEERS_MIN-$PEERS_MAX connected peers
EOF

[[ -n $DOC ]] || exit 0
SECTION=$WORK/section.md
cat >"$SECTION" <<EOF
## Peer-to-peer network: $NODES nodes on loopback

_Generated by \`tests/bench/run.sh p2p\` (part of \`make bench\`) on $NOW, commit $COMMIT,
on $CPU_MODEL ($CORES cores, $MEM_GIB GiB). Rewritten on every run: edit outside the
\`bench:p2p\` markers._

| figure | value |
|---|---|
| start of node 0 → every node has ≥ $TABLE peers in its Kademlia routing table | **$TABLE_S s** |
| of which: until all $NODES nodes had written node.json (schema, TLS, listeners) | $READY_S s |
| of which: from all nodes ready until every table had ≥ $TABLE peers | $AFTER_S s |
| DHT peer lookup (\`network find-peer\`), median | **$P50 ms** |
| DHT peer lookup, p99 | **$P99 ms** |
| lookups answered / failed | $LOOKUP_OK / $FAILED |
| resident memory (VmRSS) per node, median / max | **$RSS_MED MiB** / $RSS_MAX MiB |
| connected peers per node when memory was read | $PEERS_MIN–$PEERS_MAX |

How: a release build; $NODES real \`cosmicsync\` processes on 127.0.0.1 (TCP + QUIC, port 0,
\`--kad-mode server\`), each with one shard database on one shared PostgreSQL server
(\`--shard-url\`, \`--pool-size 2\`), so the figures are about the network rather than
about $NODES PostgreSQL clusters on $CORES cores. Node 0 starts first; the others start
together, each knowing only node 0. Routing tables are polled over the control socket
(\`cosmicsync network status\`). A lookup is a full iterative Kademlia \`FIND_NODE\` for
a random other node from a random node, timed inside the node (\`elapsed_ms\`, without
the CLI's process start); nodes connect to the peers the DHT shows them, so most lookups
are round trips on open connections. Memory is the whole node process (actors, HTTPS
server, pools, libp2p), read after the lookups.
EOF
doc_replace_section "$DOC" p2p "$SECTION"
log "wrote section bench:p2p of $DOC"
