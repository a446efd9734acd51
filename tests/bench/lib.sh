# shellcheck shell=bash
# Helpers shared by the benchmark scripts in tests/bench/. Source it, do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# It defines functions only (plus the `log`/`warn`/`die` output helpers); the caller
# owns `set -euo pipefail`, its traps and its temp directories.
#
#   ensure_tool CMD [DEBIAN_PACKAGE]   install a missing tool with apt-get (root only)
#   pg_bin_dir                         the directory holding the PostgreSQL binaries
#   as_pg_owner CMD...                 run a command as the owner of a node's cluster
#   node_start DATA_DIR LOG ARGS...    start a release node, wait for node.json
#   node_stop                          SIGTERM the node and wait for it to go
#   rss_kib PID [FIELD]                VmRSS (or VmHWM, …) of a process in KiB
#   doc_replace_section FILE NAME CONTENT_FILE
#                                      rewrite one generated section of a Markdown file
#   machine_facts                      set CPU_MODEL MEM_GIB RUSTC COMMIT NOW for a report
#   machine_table                      the head of a report's Markdown machine table

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# ensure_tool CMD [PACKAGE]: makes sure CMD is on PATH. When it is missing and we are
# root, installs PACKAGE (default: CMD) from Debian, running `apt-get update` only if
# the first attempt fails (the package lists may be stale or absent).
ensure_tool() {
    local cmd=$1 pkg=${2:-$1}
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
        die "$cmd is missing; install the Debian package $pkg (apt-get install $pkg)"
    fi
    log "installing $pkg (for $cmd)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null; then
        log "apt-get install $pkg failed; running apt-get update and retrying"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null
    fi
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is still missing after installing $pkg"
}

# pg_bin_dir: prints the PostgreSQL binary directory (with pgbench in it), looking where
# the node does: `pg_config --bindir`, then the newest /usr/lib/postgresql/*/bin.
pg_bin_dir() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $dir && -x $dir/pgbench && -x $dir/postgres ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    fi
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        if [[ -x $dir/pgbench && -x $dir/postgres ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    return 1
}

# as_pg_owner CMD...: runs CMD as the account that owns the node's PostgreSQL: the
# `postgres` user when we are root (the node drops to it, PostgreSQL refuses root),
# otherwise ourselves. From `/`, so a directory postgres cannot read does not matter.
as_pg_owner() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# proc_alive PID: true while PID runs (a zombie, exited but not yet reaped, counts as gone).
proc_alive() {
    local state
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# rss_kib PID [FIELD]: a memory figure of a process from /proc/PID/status, in KiB.
# FIELD is VmRSS (resident now, the default) or VmHWM (peak resident).
rss_kib() {
    awk -v f="${2:-VmRSS}:" '$1 == f { print $2; found = 1 } END { exit !found }' "/proc/$1/status"
}

# node_spawn DATA_DIR LOG ARGS...: starts target/release/cosmicsync (or $BENCH_BIN) on
# DATA_DIR in the background with its output in LOG; sets SPAWNED_PID. The node gets the
# default configuration: COSMICSYNC_* variables of the caller's environment are dropped,
# so only ARGS differ from a plain `cosmicsync start`.
SPAWNED_PID=
node_spawn() {
    local dir=$1 logfile=$2
    shift 2
    local bin=${BENCH_BIN:-$ROOT/target/release/cosmicsync}
    [[ -x $bin ]] || die "$bin not found; run cargo build --release"
    (
        unset "${!COSMICSYNC_@}"
        exec "$bin" --data-dir "$dir" start "$@"
    ) </dev/null >"$logfile" 2>&1 &
    SPAWNED_PID=$!
}

# node_wait_ready DATA_DIR PID LOG: waits until the node PID has written DATA_DIR/node.json
# (with its own pid); if it exits or takes longer than $BENCH_START_TIMEOUT (120 s),
# prints LOG and exits.
node_wait_ready() {
    local dir=$1 pid=$2 logfile=$3
    local timeout=${BENCH_START_TIMEOUT:-120}
    local deadline=$((SECONDS + timeout))
    until [[ -f $dir/node.json ]] && [[ $(jq -r '.pid' "$dir/node.json" 2>/dev/null) == "$pid" ]]; do
        if ! proc_alive "$pid"; then
            local status=0
            wait "$pid" || status=$?
            printf -- '--- node log (%s) ---\n' "$logfile" >&2
            cat "$logfile" >&2
            die "the node exited during start (status $status)"
        fi
        if ((SECONDS >= deadline)); then
            printf -- '--- node log (%s) ---\n' "$logfile" >&2
            cat "$logfile" >&2
            die "the node did not write $dir/node.json within ${timeout} s"
        fi
        sleep 0.1
    done
}

# node_start DATA_DIR LOG ARGS...: node_spawn, then node_wait_ready. Sets NODE_PID,
# NODE_DIR, NODE_API, NODE_CERT (for node_stop and the caller).
NODE_PID=
NODE_DIR=
node_start() {
    local dir=$1 logfile=$2
    NODE_DIR=$dir
    node_spawn "$@"
    NODE_PID=$SPAWNED_PID
    node_wait_ready "$dir" "$NODE_PID" "$logfile" || { NODE_PID=; return 1; }
    # shellcheck disable=SC2034 # for the caller
    NODE_API=$(jq -r '.api_url' "$dir/node.json")
    # shellcheck disable=SC2034 # for the caller
    NODE_CERT=$(jq -r '.tls_cert' "$dir/node.json")
}

# node_stop: stops the node started by node_start (if any) with SIGTERM and waits for
# its process to go; the node stops its PostgreSQL itself. After 60 s it is killed, and
# then its PostgreSQL is stopped here. Safe to call twice.
node_stop() {
    [[ -n ${NODE_PID:-} ]] || return 0
    local pid=$NODE_PID
    NODE_PID=
    if proc_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 60))
        while proc_alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if proc_alive "$pid"; then
            warn "node $pid still runs 60 s after SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    # Only a node that did not stop gracefully leaves its PostgreSQL running.
    local pg=$NODE_DIR/pg bin
    if [[ -f $pg/postmaster.pid ]] && bin=$(pg_bin_dir); then
        warn "stopping the PostgreSQL the node left running in $pg"
        as_pg_owner "$bin/pg_ctl" -D "$pg" stop -m immediate -w >/dev/null 2>&1 || true
    fi
}

# doc_replace_section FILE NAME CONTENT_FILE: puts CONTENT_FILE between the lines
#   <!-- bench:NAME:begin -->   and   <!-- bench:NAME:end -->
# of the Markdown FILE, leaving every other line (hand-written text, other benchmarks'
# sections) as it was. A missing FILE is created with a short header; a section not yet
# in FILE is inserted before the first `## Analysis` heading, or appended. The file is
# replaced atomically, so an interrupted run never leaves half a document.
doc_replace_section() {
    local file=$1 name=$2 content=$3
    local begin="<!-- bench:$name:begin -->" end="<!-- bench:$name:end -->"
    local tmp
    tmp=$(mktemp "$(dirname "$file")/.$(basename "$file").XXXXXX")
    if [[ ! -f $file ]]; then
        # shellcheck disable=SC2016 # backticks are Markdown here
        {
            printf '# Benchmarks\n\n'
            printf 'Run them with `make bench`. Sections between `<!-- bench:NAME:begin -->` and\n'
            printf '`<!-- bench:NAME:end -->` markers are rewritten by the benchmark scripts; write\n'
            printf 'anything else (such as the analysis) outside the markers and it is kept.\n\n'
            printf '## Analysis\n\n_Not written yet._\n'
        } >"$file"
    fi
    local n_begin n_end
    n_begin=$(grep -cxF -- "$begin" "$file" || true)
    n_end=$(grep -cxF -- "$end" "$file" || true)
    if [[ $n_begin == 0 && $n_end == 0 ]]; then
        # Not there yet: insert it (with blank lines around) before "## Analysis" or at the end.
        awk -v begin="$begin" -v end="$end" -v content="$content" '
            function section(   line) {
                print begin
                while ((getline line < content) > 0) print line
                print end
                print ""
                done = 1
            }
            !done && /^## Analysis[[:space:]]*$/ { section() }
            { print }
            END { if (!done) { print ""; section() } }
        ' "$file" >"$tmp"
    elif [[ $n_begin == 1 && $n_end == 1 ]] &&
        (($(grep -nxF -- "$begin" "$file" | cut -d: -f1) < $(grep -nxF -- "$end" "$file" | cut -d: -f1))); then
        awk -v begin="$begin" -v end="$end" -v content="$content" '
            $0 == begin { print; while ((getline line < content) > 0) print line; skip = 1; next }
            $0 == end { skip = 0 }
            !skip { print }
        ' "$file" >"$tmp"
    else
        rm -f -- "$tmp"
        die "$file: the markers of section '$name' are damaged (need exactly one '$begin' before one '$end'); fix them by hand"
    fi
    chmod 0644 "$tmp"
    mv -- "$tmp" "$file"
}

# machine_facts: sets CPU_MODEL, MEM_GIB, RUSTC, COMMIT (short hash of $ROOT, marked when
# tracked files have uncommitted changes) and NOW (UTC), for a report's machine table.
machine_facts() {
    # shellcheck disable=SC2034 # for the caller
    CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    # shellcheck disable=SC2034
    MEM_GIB=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
    # shellcheck disable=SC2034
    RUSTC=$(rustc --version 2>/dev/null || echo unknown)
    COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ $COMMIT != unknown && -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        COMMIT="$COMMIT (with uncommitted changes)"
    fi
    # shellcheck disable=SC2034
    NOW=$(date -u '+%Y-%m-%d %H:%M UTC')
}

# machine_table_full LOAD: the machine table with the build's facts and the load average
# before the run (what the batch benchmarks record). Needs machine_facts first.
machine_table_full() {
    machine_table
    printf '| rustc | %s |\n| cosmicsync commit | %s |\n' "$RUSTC" "$COMMIT"
    printf '| Date | %s |\n| Load average before the run | %s |\n' "$NOW" "$1"
}

# machine_table: prints the head of a Markdown machine table (CPUs, model, memory,
# kernel); the caller appends its own rows. Needs machine_facts first.
machine_table() {
    printf '| | |\n|---|---|\n'
    printf '| CPUs (nproc) | %s |\n| CPU model | %s |\n' "$(nproc)" "$CPU_MODEL"
    printf '| Memory | %s GiB |\n| Kernel | %s |\n' "$MEM_GIB" "$(uname -r)"
}
