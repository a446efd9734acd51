#!/usr/bin/env bash
# API benchmark of a cosmicsync node (`make bench`). A benchmark, not a test: it prints
# figures and records them in docs/BENCHMARKS.md; it never runs in `make test`.
#
# What it does:
#   1. installs wrk, jq and curl if missing (Debian packages; needs root) and finds
#      pgbench next to the PostgreSQL server binaries;
#   2. builds the release binary and starts a node with the default configuration
#      (4 shards, pool of 16 per shard) in a fresh temp data directory;
#   3. records the node process's idle resident memory (VmRSS) after a few idle seconds;
#   4. registers and logs in a user, then loads the HTTPS API with wrk:
#      GET /api/v1/users/{id}, POST /api/v1/projects and GET /healthz;
#   5. runs pgbench -S (select-only, prepared) against the node's own PostgreSQL, the
#      ceiling any read endpoint works under;
#   6. prints a summary and rewrites its section of docs/BENCHMARKS.md (between
#      <!-- bench:api:begin --> and <!-- bench:api:end -->; the rest is kept);
#   7. always stops the node and removes the temp directory (trap on exit).
#
# Knobs (environment):
#   BENCH_DURATION=20     seconds of each measured run (wrk and pgbench)
#   BENCH_CONNECTIONS=64  concurrent connections (wrk) and clients (pgbench)
#   BENCH_THREADS=2       wrk threads and pgbench jobs
#   BENCH_WARMUP=3        seconds of unmeasured wrk load before each measured run
#   BENCH_IDLE=5          idle seconds before the memory reading
#   BENCH_PGBENCH_SCALE=10  pgbench -i scale factor (10 = one million accounts)
#   BENCH_DOC=docs/BENCHMARKS.md  where to write the results ("" = do not write)
#   BENCH_BUILD=1         0 skips `cargo build --release` (use the binary as it is)
#   BENCH_BIN=target/release/cosmicsync
# Quick run: BENCH_DURATION=5 BENCH_CONNECTIONS=16 make bench

set -euo pipefail

# `run.sh api` is this API benchmark, `run.sh reco` the recommendation batch
# (tests/bench/reco.sh), `run.sh p2p` the network one (tests/bench/p2p.sh), `run.sh sync`
# the replication one (tests/bench/sync.sh), and `run.sh` (or `all`) all four, each with
# its own section of docs/BENCHMARKS.md.
HERE=$(dirname "${BASH_SOURCE[0]}")
case ${1:-all} in
    api) ;;
    reco) exec bash "$HERE/reco.sh" ;;
    p2p) exec bash "$HERE/p2p.sh" ;;
    sync) exec bash "$HERE/sync.sh" ;;
    all) bash "${BASH_SOURCE[0]}" api && bash "$HERE/reco.sh" && BENCH_BUILD=0 bash "$HERE/p2p.sh" &&
        exec bash "$HERE/sync.sh" ;;
    *) echo "usage: $0 [api|reco|p2p|sync|all]" >&2 && exit 2 ;;
esac

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/../.." && pwd)
# shellcheck source=tests/bench/lib.sh
source "$BENCH_DIR/lib.sh"


DURATION=${BENCH_DURATION:-20}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
WARMUP=${BENCH_WARMUP:-3}
IDLE=${BENCH_IDLE:-5}
SCALE=${BENCH_PGBENCH_SCALE:-10}
DOC=${BENCH_DOC-$ROOT/docs/BENCHMARKS.md}
BUILD=${BENCH_BUILD:-1}

for knob in DURATION CONNECTIONS THREADS WARMUP IDLE SCALE; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || die "BENCH_* settings must be whole numbers ($knob is '${!knob}')"
done
((DURATION >= 1 && CONNECTIONS >= 1 && THREADS >= 1 && SCALE >= 1)) ||
    die "BENCH_DURATION, BENCH_CONNECTIONS, BENCH_THREADS and BENCH_PGBENCH_SCALE must be at least 1"
# The node's PostgreSQL allows 200 connections; the node's pools may hold 4 x 16 of them
# while pgbench runs, and PostgreSQL reserves 3 for superusers.
((CONNECTIONS <= 128)) || die "BENCH_CONNECTIONS must be at most 128 (PostgreSQL max_connections is 200)"
# wrk and pgbench both refuse more threads than connections.
((THREADS <= CONNECTIONS)) || THREADS=$CONNECTIONS

# Product targets (docs/BENCHMARKS.md repeats them).
TARGET_RATIO=0.3 # GET /users/{id} req/s ÷ pgbench TPS, at least
TARGET_P99_MS=10 # p99 of GET /users/{id}, below
TARGET_RSS_MIB=50 # idle resident memory of the node process, below

# ---------------------------------------------------------------------------------------
# 1. Tools
# ---------------------------------------------------------------------------------------
ensure_tool wrk
ensure_tool jq
ensure_tool curl
PGBIN=$(pg_bin_dir) || die "PostgreSQL binaries not found (run .ci/ensure-postgres or apt-get install postgresql)"
for tool in pgbench psql createdb postgres; do
    [[ -x $PGBIN/$tool ]] || die "$PGBIN/$tool is missing"
done

# ---------------------------------------------------------------------------------------
# 2. Build, temp directory, cleanup
# ---------------------------------------------------------------------------------------
if [[ $BUILD != 0 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && "${CARGO:-cargo}" build --release)
fi

# Everything of this run lives in WORK; the node's data directory is WORK/node. WORK is
# 0711 so that the `postgres` account can reach the cluster in WORK/node/pg (the node
# itself makes WORK/node traversable).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cosmicsync-bench.XXXXXX")
chmod 0711 "$WORK"
DATA=$WORK/node
NODE_LOG=$WORK/node.log
mkdir "$DATA"

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    node_stop || true
    if ((status != 0)) && [[ -f $NODE_LOG ]]; then
        printf -- '--- last lines of the node log ---\n' >&2
        tail -n 30 "$NODE_LOG" >&2 || true
    fi
    rm -rf -- "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# 3. Start the node, idle memory
# ---------------------------------------------------------------------------------------
# --bcrypt-cost 4 only speeds up registering and logging in the benchmark user; no
# measured request hashes a password (bcrypt cost would dominate a login benchmark).
# Every port is 0, so the benchmark runs beside a node on the default ports (a node
# refuses a p2p port another process listens on).
log "starting a release node in $DATA"
node_start "$DATA" "$NODE_LOG" --http-addr 127.0.0.1:0 --bcrypt-cost 4 \
    --p2p-listen /ip4/127.0.0.1/tcp/0 --p2p-listen /ip4/127.0.0.1/udp/0/quic-v1
log "node $NODE_PID ready at $NODE_API; idle for $IDLE s"
sleep "$IDLE"
RSS_IDLE_KIB=$(rss_kib "$NODE_PID")

# ---------------------------------------------------------------------------------------
# CPU accounting, to see where the time goes during each run, in cores (1.00 = one CPU
# busy for the whole run):
#   node    the node process (all its threads);
#   pg      its PostgreSQL: postmaster and live backends, plus exited backends through
#           the postmaster's cutime/cstime;
#   client  the load generator: this shell's reaped children (wrk, pgbench);
#   other   whatever else kept the machine busy (from /proc/stat): other people's
#           processes on a shared machine; if it is not near 0, the figures are disturbed.
# ---------------------------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
PG_PID=$(head -n 1 "$DATA/pg/postmaster.pid")

# proc_ticks PID [WITH_CHILDREN]: utime+stime of PID (+ cutime+cstime if asked), in ticks.
proc_ticks() {
    sed -E 's/^.*\) //' "/proc/$1/stat" 2>/dev/null |
        awk -v c="${2:-0}" '{ print $12 + $13 + (c ? $14 + $15 : 0) }' || echo 0
}
pg_ticks() {
    local total child
    total=$(proc_ticks "$PG_PID" 1)
    for child in $(ps -o pid= --ppid "$PG_PID"); do
        total=$((total + $(proc_ticks "$child")))
    done
    echo "$total"
}
pg_backend_count() { ps -o pid= --ppid "$PG_PID" | wc -l; }
# machine_ticks: "busy total" summed over all CPUs (busy excludes idle and iowait).
machine_ticks() {
    awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}
# cpu_snapshot: "node pg client machine_busy machine_total", all in ticks.
cpu_snapshot() { echo "$(proc_ticks "$NODE_PID") $(pg_ticks) $(proc_ticks $$ 1) $(machine_ticks)"; }
# cpu_report BEFORE AFTER: "node pg client other" in cores over the time between the two.
cpu_report() {
    awk -v hz="$CLK_TCK" -v ncpu="$NCPU" -v a="$1" -v b="$2" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        secs = (y[5] - x[5]) / ncpu / hz
        if (secs <= 0) { print "0 0 0 0"; exit }
        node = (y[1] - x[1]) / hz / secs; pg = (y[2] - x[2]) / hz / secs
        client = (y[3] - x[3]) / hz / secs; busy = (y[4] - x[4]) / hz / secs
        other = busy - node - pg - client
        printf "%.2f %.2f %.2f %.2f\n", node, pg, client, (other > 0 ? other : 0)
    }'
}

# ---------------------------------------------------------------------------------------
# 4. API load with wrk
# ---------------------------------------------------------------------------------------
# api METHOD PATH [BODY [TOKEN]]: one request with curl; prints "STATUS BODY".
api() {
    local method=$1 path=$2 body=${3:-} token=${4:-}
    local args=(-sS --cacert "$NODE_CERT" -X "$method" -w '\n%{http_code}' -H 'content-type: application/json')
    [[ -n $body ]] && args+=(--data "$body")
    [[ -n $token ]] && args+=(-H "authorization: Bearer $token")
    curl "${args[@]}" "$NODE_API$path"
}
# expect STATUS RESPONSE: checks the status line api() appended; prints the body.
expect() {
    local want=$1 response=$2
    local got=${response##*$'\n'} body=${response%$'\n'*}
    [[ $got == "$want" ]] || die "expected HTTP $want, got $got: $body"
    printf '%s\n' "$body"
}

log "registering and logging in the benchmark user"
PASSWORD='correct horse battery'
USER_ID=$(expect 201 "$(api POST /api/v1/users \
    "{\"username\":\"bench\",\"email\":\"bench@example.org\",\"password\":\"$PASSWORD\"}")" | jq -r '.id')
TOKEN=$(expect 200 "$(api POST /api/v1/auth/login \
    "{\"username\":\"bench\",\"password\":\"$PASSWORD\"}")" | jq -r '.access_token')
[[ $USER_ID =~ ^[0-9a-f-]{36}$ && -n $TOKEN && $TOKEN != null ]] || die "unexpected register/login answer"
PROJECT_BODY='{"name":"Benchmark project","description":"created by tests/bench/run.sh","tags":["bench"]}'
# One request of each kind first: the load runs only count status >= 400 as errors.
expect 200 "$(api GET "/api/v1/users/$USER_ID" "" "$TOKEN")" >/dev/null
expect 201 "$(api POST /api/v1/projects "$PROJECT_BODY" "$TOKEN")" >/dev/null
expect 200 "$(api GET /healthz)" >/dev/null

# wrk_script FILE METHOD [BODY [TOKEN]]: a wrk Lua script for one kind of request whose
# done() hook prints one machine-readable line with wrk's own figures (microseconds).
wrk_script() {
    local file=$1 method=$2 body=${3:-} token=${4:-}
    {
        echo '-- Generated by tests/bench/run.sh.'
        echo "wrk.method = \"$method\""
        [[ -n $token ]] && echo "wrk.headers[\"Authorization\"] = \"Bearer $token\""
        if [[ -n $body ]]; then
            echo 'wrk.headers["Content-Type"] = "application/json"'
            echo "wrk.body = [==[$body]==]"
        fi
        cat <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
    "connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
LUA
    } >"$file"
}

declare -A R # results: R[name.field]

# field LINE NAME: the value of NAME=... in a BENCH_RESULT line.
field() { sed -nE "s/.*[[:space:]]$2=([0-9.]+).*/\1/p" <<<"$1"; }

# run_wrk NAME PATH SCRIPT: warm-up, then the measured run; fills R[NAME.*].
run_wrk() {
    local name=$1 path=$2 script=$3 out=$WORK/wrk-$1.txt
    if ((WARMUP > 0)); then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -s "$script" "$NODE_API$path" >/dev/null
    fi
    log "wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency: ${script##*/wrk-} $path"
    local before after
    before=$(cpu_snapshot)
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$script" "$NODE_API$path" | tee "$out" >&2
    after=$(cpu_snapshot)
    local line
    line=$(grep '^BENCH_RESULT ' "$out") || die "no result line in the wrk output ($out)"
    local requests duration
    requests=$(field "$line" requests)
    duration=$(field "$line" duration_us)
    ((requests > 0)) || die "wrk completed no request on $path"
    R[$name.rps]=$(awk -v n="$requests" -v d="$duration" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
    R[$name.p50]=$(awk -v u="$(field "$line" p50_us)" 'BEGIN { printf "%.2f", u / 1000 }')
    R[$name.p90]=$(awk -v u="$(field "$line" p90_us)" 'BEGIN { printf "%.2f", u / 1000 }')
    R[$name.p99]=$(awk -v u="$(field "$line" p99_us)" 'BEGIN { printf "%.2f", u / 1000 }')
    R[$name.max]=$(awk -v u="$(field "$line" max_us)" 'BEGIN { printf "%.1f", u / 1000 }')
    local status sock=0 kind
    status=$(field "$line" status)
    for kind in connect read write timeout; do
        sock=$((sock + $(field "$line" "$kind")))
    done
    # A failing endpoint answers fast: its figures would be meaningless, so stop here.
    ((status == 0)) || die "$status of $requests responses to $path had status >= 400 (see $out)"
    ((sock == 0)) || warn "$sock socket errors or timeouts on $path"
    R[$name.errors]=$sock
    read -r "R[$name.node]" "R[$name.pg]" "R[$name.client]" "R[$name.other]" <<<"$(cpu_report "$before" "$after")"
}

wrk_script "$WORK/wrk-get-user.lua" GET "" "$TOKEN"
wrk_script "$WORK/wrk-post-project.lua" POST "$PROJECT_BODY" "$TOKEN"
wrk_script "$WORK/wrk-healthz.lua" GET
LOAD_AVG=$(cut -d' ' -f1-3 /proc/loadavg)
run_wrk get "/api/v1/users/$USER_ID" "$WORK/wrk-get-user.lua"
run_wrk post /api/v1/projects "$WORK/wrk-post-project.lua"
run_wrk healthz /healthz "$WORK/wrk-healthz.lua"

# ---------------------------------------------------------------------------------------
# 5. pgbench against the node's own PostgreSQL
# ---------------------------------------------------------------------------------------
# Over the node's Unix socket (the socket lives in the cluster directory, mode 0700,
# owned by the account PostgreSQL runs as). Root can use it directly; anyone else must
# be that account, so try directly first and fall back to running as the owner.
PG_ARGS=(-h "$DATA/pg" -p 5432 -U postgres)
PG_AS=()
if "$PGBIN/psql" "${PG_ARGS[@]}" -d postgres -XAtqc 'SELECT 1' >/dev/null 2>&1; then
    PG_AS=()
elif is_root && as_pg_owner "$PGBIN/psql" "${PG_ARGS[@]}" -d postgres -XAtqc 'SELECT 1' >/dev/null 2>&1; then
    PG_AS=(as_pg_owner)
else
    die "cannot connect to the node's PostgreSQL over $DATA/pg"
fi
log "pgbench -i -s $SCALE (separate database 'bench')"
"${PG_AS[@]}" "$PGBIN/createdb" "${PG_ARGS[@]}" bench
"${PG_AS[@]}" "$PGBIN/pgbench" "${PG_ARGS[@]}" -i -s "$SCALE" -q bench >"$WORK/pgbench-init.txt" 2>&1 ||
    { cat "$WORK/pgbench-init.txt" >&2; die "pgbench -i failed"; }
PG_VERSION=$("${PG_AS[@]}" "$PGBIN/psql" "${PG_ARGS[@]}" -d bench -XAtqc 'SHOW server_version')
PG_SETTINGS=$("${PG_AS[@]}" "$PGBIN/psql" "${PG_ARGS[@]}" -d bench -XAtqc \
    "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ', ' ORDER BY name) FROM pg_settings
      WHERE name IN ('max_connections', 'shared_buffers', 'synchronous_commit', 'fsync')")

log "pgbench -S -M prepared -c $CONNECTIONS -j $THREADS -T $DURATION"
BACKENDS=$(pg_backend_count)
BEFORE=$(cpu_snapshot)
"${PG_AS[@]}" "$PGBIN/pgbench" "${PG_ARGS[@]}" -S -M prepared -c "$CONNECTIONS" -j "$THREADS" -T "$DURATION" bench \
    2>&1 | tee "$WORK/pgbench.txt" >&2
# pgbench's backends exit after it does; their CPU time reaches the postmaster's cutime
# only once it has reaped them.
for _ in {1..50}; do
    (($(pg_backend_count) <= BACKENDS)) && break
    sleep 0.1
done
AFTER=$(cpu_snapshot)
R[pgbench.tps]=$(awk '/^tps = / { printf "%.0f", $3; exit }' "$WORK/pgbench.txt")
R[pgbench.lat]=$(awk '/^latency average = / { printf "%.3f", $4; exit }' "$WORK/pgbench.txt")
[[ -n ${R[pgbench.tps]} && -n ${R[pgbench.lat]} ]] || die "cannot read tps/latency from the pgbench output"
((${R[pgbench.tps]} > 0)) || die "pgbench reported 0 TPS"
read -r "R[pgbench.node]" "R[pgbench.pg]" "R[pgbench.client]" "R[pgbench.other]" <<<"$(cpu_report "$BEFORE" "$AFTER")"

# Memory after the load: what the node holds now and the most it ever held.
RSS_AFTER_KIB=$(rss_kib "$NODE_PID")
RSS_PEAK_KIB=$(rss_kib "$NODE_PID" VmHWM)
node_stop

# ---------------------------------------------------------------------------------------
# 6. Summary and docs/BENCHMARKS.md
# ---------------------------------------------------------------------------------------
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
RATIO=$(awk -v a="${R[get.rps]}" -v b="${R[pgbench.tps]}" 'BEGIN { printf "%.3f", a / b }')
RSS_IDLE_MIB=$(mib "$RSS_IDLE_KIB")
met() { awk "BEGIN { exit !($1) }" && echo met || echo "**not met**"; }
READ_MET=$(met "$RATIO >= $TARGET_RATIO && ${R[get.p99]} < $TARGET_P99_MS")
RSS_MET=$(met "$RSS_IDLE_KIB < $TARGET_RSS_MIB * 1024")

# Someone else's work during a run (this machine may be shared) makes its figures suspect.
DISTURBED=
MAX_OTHER=$(printf '%s\n' "${R[get.other]}" "${R[post.other]}" "${R[healthz.other]}" "${R[pgbench.other]}" | sort -g | tail -n 1)
if awk -v o="$MAX_OTHER" 'BEGIN { exit !(o >= 0.15) }'; then
    DISTURBED="

**Disturbed run:** other processes used up to $MAX_OTHER cores during a measured run
(column \"other\"); the figures of that run are lower and its tail latencies longer than
on a quiet machine. Run \`make bench\` again when the machine is idle."
    warn "other processes used up to $MAX_OTHER cores during a measured run: the figures are disturbed"
fi

machine_facts

cat >&2 <<EOF

=== cosmicsync API benchmark ($CONNECTIONS connections, $THREADS threads, ${DURATION}s per run) ===
GET  /api/v1/users/{id}  ${R[get.rps]} req/s   p50 ${R[get.p50]} ms   p99 ${R[get.p99]} ms
POST /api/v1/projects    ${R[post.rps]} req/s   p50 ${R[post.p50]} ms   p99 ${R[post.p99]} ms
GET  /healthz            ${R[healthz.rps]} req/s   p50 ${R[healthz.p50]} ms   p99 ${R[healthz.p99]} ms
pgbench -S -M prepared   ${R[pgbench.tps]} TPS     latency average ${R[pgbench.lat]} ms
ratio GET /users/{id} req/s ÷ pgbench TPS = $RATIO   (target >= $TARGET_RATIO with p99 < $TARGET_P99_MS ms: $READ_MET)
node idle RSS            $RSS_IDLE_MIB MiB   (target < $TARGET_RSS_MIB MiB: $RSS_MET)
CPU in cores (node, PostgreSQL, load generator, other):
  GET user ${R[get.node]} ${R[get.pg]} ${R[get.client]} ${R[get.other]}; POST project ${R[post.node]} ${R[post.pg]} ${R[post.client]} ${R[post.other]}; healthz ${R[healthz.node]} ${R[healthz.pg]} ${R[healthz.client]} ${R[healthz.other]}; pgbench ${R[pgbench.node]} ${R[pgbench.pg]} ${R[pgbench.client]} ${R[pgbench.other]}
EOF


[[ -n $DOC ]] || exit 0
SECTION=$WORK/section.md
cat >"$SECTION" <<EOF
## API throughput and latency against raw PostgreSQL

_Generated by \`make bench\` (\`tests/bench/run.sh\`) on $NOW. This section is
rewritten on every run: edit outside the \`bench:api\` markers._

### What is measured and how

- A release build of \`cosmicsync\` with the default configuration (4 shards in its own
  PostgreSQL, a pool of 16 connections per shard), started in a fresh temp data directory
  with \`--http-addr 127.0.0.1:0 --bcrypt-cost 4\`. The low bcrypt cost only speeds up
  registering and logging in the one benchmark user; no measured request hashes a
  password, so it does not change these figures (it would invalidate a login benchmark).
- **API**: [wrk](https://github.com/wg/wrk) over HTTPS on loopback (wrk does not verify
  the self-signed certificate), \`-t$THREADS -c$CONNECTIONS -d${DURATION}s --latency\`,
  each run after a ${WARMUP} s unmeasured warm-up. Keep-alive connections, so TLS
  handshakes are not part of the figures.
  - \`GET /api/v1/users/{id}\` with the user's bearer token: JWT check in the AuthActor,
    one primary-key \`SELECT\` on the user's shard, JSON response. One user, so every
    request goes to the same shard (and its pool of 16 connections).
  - \`POST /api/v1/projects\` with a small JSON body: a write transaction on the creator's
    shard (project row plus change-log entry).
  - \`GET /healthz\`: no token, no actor, no database: the ceiling of the HTTPS and
    HTTP layer on this machine.
  - Latency is wrk's, per request, measured from the client; p50/p99 are percentiles of
    all requests of the run. A run with any response status >= 400 is rejected.
- **PostgreSQL ceiling**: \`pgbench -S -M prepared -c $CONNECTIONS -j $THREADS -T $DURATION\`
  (select-only: one primary-key \`SELECT\` per transaction, over the Unix socket) against
  the node's own PostgreSQL server, in a separate database \`bench\` made with
  \`pgbench -i -s $SCALE\`, while the node is idle. Server settings:
  $PG_SETTINGS.
- **Read ratio**: \`GET /users/{id}\` requests/s ÷ pgbench TPS: the share of the raw
  database's point-read throughput the API delivers for a point read.
- **Idle RSS**: \`VmRSS\` of the node process from \`/proc/PID/status\`, ${IDLE} s after it
  reported ready (node.json written). The node process only: its PostgreSQL server runs
  as separate processes and is not included.
- **CPU columns**: CPU time used during the measured run, in cores (1.00 = one CPU busy
  for the whole run; this machine has $NCPU): the node process (all threads); its
  PostgreSQL (all server processes); the load generator (wrk or pgbench), which shares
  the machine; and "other", everything else that kept the CPUs busy (from
  \`/proc/stat\`). On a shared machine a clearly non-zero "other" means the run was
  disturbed by someone else's work.

### Machine

$(machine_table)
| PostgreSQL | $PG_VERSION |
| rustc | $RUSTC |
| cosmicsync commit | $COMMIT |
| Date | $NOW |
| Load average before the runs | $LOAD_AVG |

### Results

| Workload | Throughput | p50 | p99 | CPU: node | PostgreSQL | load generator | other |
|---|---:|---:|---:|---:|---:|---:|---:|
| \`GET /api/v1/users/{id}\` | ${R[get.rps]} req/s | ${R[get.p50]} ms | ${R[get.p99]} ms | ${R[get.node]} | ${R[get.pg]} | ${R[get.client]} | ${R[get.other]} |
| \`POST /api/v1/projects\` | ${R[post.rps]} req/s | ${R[post.p50]} ms | ${R[post.p99]} ms | ${R[post.node]} | ${R[post.pg]} | ${R[post.client]} | ${R[post.other]} |
| \`GET /healthz\` (HTTPS only) | ${R[healthz.rps]} req/s | ${R[healthz.p50]} ms | ${R[healthz.p99]} ms | ${R[healthz.node]} | ${R[healthz.pg]} | ${R[healthz.client]} | ${R[healthz.other]} |
| \`pgbench -S -M prepared\` | ${R[pgbench.tps]} TPS | avg ${R[pgbench.lat]} ms | – | ${R[pgbench.node]} | ${R[pgbench.pg]} | ${R[pgbench.client]} | ${R[pgbench.other]} |$DISTURBED

| Figure | Value |
|---|---:|
| Read ratio (\`GET /users/{id}\` req/s ÷ pgbench TPS) | $RATIO |
| Node process idle RSS | $RSS_IDLE_MIB MiB |
| Node process RSS after the load runs (peak) | $(mib "$RSS_AFTER_KIB") MiB ($(mib "$RSS_PEAK_KIB") MiB) |
| Socket errors / timeouts (GET user, POST project, healthz) | ${R[get.errors]}, ${R[post.errors]}, ${R[healthz.errors]} |

### Targets

| Product target | Measured | |
|---|---|---|
| Read ratio ≥ $TARGET_RATIO with \`GET /users/{id}\` p99 < $TARGET_P99_MS ms | ratio $RATIO, p99 ${R[get.p99]} ms | $READ_MET |
| Idle RSS of the node process < $TARGET_RSS_MIB MB (MiB here) | $RSS_IDLE_MIB MiB | $RSS_MET |
EOF
mkdir -p "$(dirname "$DOC")"
doc_replace_section "$DOC" api "$SECTION"
log "wrote ${DOC#"$ROOT"/}"
