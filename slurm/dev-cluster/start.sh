#!/usr/bin/env bash
# Start a real, local Slurm cluster for development and tests: munged, slurmctld and two slurmd
# daemons that emulate two compute nodes on this host (plus slurmdbd and MariaDB when accounting is
# asked for). Every file lives under one directory, so several clusters can coexist and nothing in
# /etc is touched.
#
# Usage:   eval "$(slurm/dev-cluster/start.sh)"
#
# stdout carries only `export ...` lines meant for eval; everything else goes to stderr.
#
# Environment (all optional):
#   SLURM_DEV_DIR         base directory of the cluster          [/tmp/trainer-slurm-dev]
#   SLURM_DEV_ACCOUNTING  1: also run slurmdbd + MariaDB, so sacct works   [0]
#   SLURM_DEV_CPUS        CPUs each emulated node declares       [what `slurmd -C` reports]
#   SLURM_DEV_NODE_NAMES  two node names that resolve to this host   [this hostname + 127.0.0.2]
#   SLURM_DEV_PORT        first of five consecutive TCP ports     [a free block from 16817 up]
#   SLURM_DEV_TIMEOUT     seconds to wait for the nodes to be idle [60]
#   SLURM_DEV_INSTALL     0: never install missing packages (exit 2 instead)   [1]
#
# Exit codes: 0 cluster up (or already running), 1 it failed to come up, 2 a prerequisite is
# missing and cannot be installed here (not root, no apt-get, or SLURM_DEV_INSTALL=0).
set -euo pipefail

# Keep stdout clean for `eval`: fd 3 is the real stdout, everything else goes to stderr.
exec 3>&1 1>&2

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly BASE_DIR="${SLURM_DEV_DIR:-/tmp/trainer-slurm-dev}"
readonly ACCOUNTING="${SLURM_DEV_ACCOUNTING:-0}"
readonly TIMEOUT_S="${SLURM_DEV_TIMEOUT:-60}"
[[ "$TIMEOUT_S" =~ ^[0-9]+$ ]] || { echo "slurm-dev: ERROR: SLURM_DEV_TIMEOUT must be a number of seconds" >&2; exit 1; }
readonly CLUSTER_NAME="trainerdev"
readonly PARTITION="dev"
# The daemons run as whoever starts them (root on CI; see the docs for running without root).
RUN_AS="$(id -un)"
readonly RUN_AS

readonly ETC="$BASE_DIR/etc" RUN="$BASE_DIR/run" LOG="$BASE_DIR/log" STATE="$BASE_DIR/state"
readonly CONF="$ETC/slurm.conf"
readonly MUNGE_SOCKET="$RUN/munge/munge.socket"

log() { printf 'slurm-dev: %s\n' "$*" >&2; }

# One line on stderr and a distinct exit code, so callers (the pytest fixture) can tell
# "cannot run here" (2) from "tried and failed" (1).
die() {
    local code="$1"
    shift
    printf 'slurm-dev: ERROR: %s\n' "$*" >&2
    exit "$code"
}

# Any other failing command still ends with one readable line instead of a silent exit 1.
set -E
trap 'die 1 "unexpected failure (line $LINENO: $BASH_COMMAND); logs in $LOG"' ERR

# --- prerequisites -------------------------------------------------------------------------------

missing_packages() {
    local -a missing=()
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    if [[ "$ACCOUNTING" == 1 ]]; then
        command -v slurmdbd >/dev/null 2>&1 || missing+=(slurmdbd)
        command -v mariadbd >/dev/null 2>&1 || missing+=(mariadb-server-core)
        command -v mariadb >/dev/null 2>&1 || missing+=(mariadb-client-core)
    fi
    echo "${missing[*]}"
}

ensure_packages() {
    # Debian ships the daemons in /usr/sbin, which a non-login root shell may lack on PATH.
    export PATH="$PATH:/usr/sbin:/sbin"
    local missing
    missing="$(missing_packages)"
    [[ -z "$missing" ]] && return 0
    if [[ "${SLURM_DEV_INSTALL:-1}" == 0 ]]; then
        die 2 "missing packages ($missing) and SLURM_DEV_INSTALL=0 forbids installing them"
    fi
    if [[ "$(id -u)" != 0 ]]; then
        die 2 "missing packages ($missing); not root, so cannot install them (as root: apt-get install $missing)"
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        die 2 "missing packages ($missing) and no apt-get to install them (install Slurm + MUNGE by hand)"
    fi
    log "installing $missing (apt-get)"
    local apt_log="${TMPDIR:-/tmp}/slurm-dev-apt.$$.log" pkgs
    read -r -a pkgs <<<"$missing"
    # --no-install-recommends keeps the install small; noninteractive keeps debconf from asking.
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } \
        >"$apt_log" 2>&1 3>&-; then
        die 2 "apt-get install $missing failed (log: $apt_log)"
    fi
    rm -f "$apt_log"
    missing="$(missing_packages)"
    [[ -z "$missing" ]] || die 2 "still missing after apt-get install: $missing"
}

# --- process helpers -----------------------------------------------------------------------------

# True when the pid file names a live process whose executable is the expected daemon; the name
# check guards against a recycled pid after a crash.
pid_alive() {
    local pidfile="$1" name="$2" pid comm
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name"* ]]
}

# The lines a daemon logged since spawn() last marked its log.
since_last_start() {
    awk '/^=== slurm-dev start/ { n = 0 } { lines[n++] = $0 } END { for (i = 0; i < n; i++) print lines[i] }' \
        "$1" 2>/dev/null || true
}

# Wait for a daemon's pid file to name a live process (the daemons fork, then write it). A daemon
# that logged a fatal error (a port taken, a bad config) is reported at once, not after the timeout.
wait_pid() {
    local pidfile="$1" name="$2" logfile="$3" deadline=$((SECONDS + 20))
    until pid_alive "$pidfile" "$name"; do
        if since_last_start "$logfile" | grep -q -E 'fatal:|\[ERROR\]'; then
            since_last_start "$logfile" | tail -n 5 >&2
            die 1 "$name failed to start (log: $logfile)"
        fi
        if ((SECONDS >= deadline)); then
            since_last_start "$logfile" | tail -n 10 >&2
            die 1 "$name did not start within 20 s (log: $logfile)"
        fi
        sleep 0.2
    done
}

# Run a daemon with its output in its log, after a marker line that wait_pid reads from. It must
# not inherit fd 3 (the caller's stdout: a `$(start.sh)` or a test harness would wait for EOF
# forever) nor fd 9 (the start lock).
spawn() {
    local logfile="$1"
    shift
    printf '=== slurm-dev start %s: %s\n' "$(date '+%F %T')" "$*" >>"$logfile"
    "$@" </dev/null >>"$logfile" 2>&1 3>&- 9>&-
}

# True when something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, no extra tools).
port_in_use() {
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# --- configuration -------------------------------------------------------------------------------

# Five consecutive ports: slurmctld, slurmd on node 1, slurmd on node 2, slurmdbd, MariaDB.
# The first start picks a free block and records it, so a restart keeps the same addresses and two
# clusters (say, a user's and the test suite's) do not collide.
choose_ports() {
    local saved="$ETC/ports"
    if [[ -s "$saved" ]]; then
        PORT_BASE="$(cat "$saved")"
        return 0
    fi
    if [[ -n "${SLURM_DEV_PORT:-}" ]]; then
        PORT_BASE="$SLURM_DEV_PORT"
    else
        # Start from a block derived from the directory, so two clusters (say, a stopped one and a
        # new one) rarely claim the same ports even when neither is running at the time.
        local sum base tries=0 off busy
        sum="$(cksum <<<"$BASE_DIR")"
        base=$((16817 + 10 * (${sum%% *} % 200)))
        while :; do
            busy=0
            for off in 0 1 2 3 4; do
                if port_in_use $((base + off)); then busy=1; break; fi
            done
            ((busy == 0)) && break
            base=$((base + 10))
            tries=$((tries + 1))
            ((tries < 100)) || die 1 "no free block of 5 TCP ports in 100 tries; set SLURM_DEV_PORT"
        done
        PORT_BASE="$base"
    fi
    echo "$PORT_BASE" >"$saved"
}

# True when the name resolves to an address; a node name that does not resolve breaks MASTER_ADDR
# taken from `scontrol show hostnames`.
resolves() {
    getent ahosts "$1" >/dev/null 2>&1
}

# Two node names that both resolve to this host, because jobs use `scontrol show hostnames` as
# MASTER_ADDR. Slurm rewrites a node called `localhost` to this machine's short hostname, so the two
# cannot be `localhost` and the hostname. Node 1 is the hostname when it resolves (Debian maps it in
# /etc/hosts); node 2 is the literal address 127.0.0.2, a name that needs no resolver at all
# (Linux routes the whole of 127.0.0.0/8 to the loopback device).
choose_node_names() {
    if [[ -n "${SLURM_DEV_NODE_NAMES:-}" ]]; then
        read -r -a NODES <<<"${SLURM_DEV_NODE_NAMES//,/ }"
        ((${#NODES[@]} == 2)) || die 1 "SLURM_DEV_NODE_NAMES must name exactly two nodes, got '${SLURM_DEV_NODE_NAMES}'"
        [[ "${NODES[0]}" != "${NODES[1]}" ]] || die 1 "SLURM_DEV_NODE_NAMES names the same node twice"
    else
        local host
        host="$(hostname -s 2>/dev/null || true)"
        if [[ -z "$host" || "$host" == localhost* || "$host" == 127.0.0.2 ]] || ! resolves "$host"; then
            host="127.0.0.1"
        fi
        NODES=("$host" 127.0.0.2)
    fi
    local n
    for n in "${NODES[@]}"; do
        [[ "$n" != localhost ]] || die 1 "a node may not be called 'localhost' (Slurm renames it to the hostname)"
        resolves "$n" || die 1 "node name '$n' does not resolve on this host (see SLURM_DEV_NODE_NAMES)"
    done
}

# CPU and memory layout for each emulated node. Both nodes share the host's CPUs: Slurm is told
# each node has them all (or SLURM_DEV_CPUS), which over-subscribes the host on purpose so a
# 2-node job fits on a 2-core laptop; SlurmdParameters=config_overrides makes slurmd accept a
# declared layout larger than the hardware.
node_layout() {
    local hw real_mem cpus
    hw="$(slurmd -C 2>/dev/null | head -n 1)"
    real_mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    [[ -n "$real_mem" ]] || real_mem="$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)"
    # Each node claims under half of the memory, so the two together stay below the real total.
    NODE_MEM=$((real_mem * 45 / 100))
    if [[ -n "${SLURM_DEV_CPUS:-}" ]]; then
        cpus="$SLURM_DEV_CPUS"
        [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die 1 "SLURM_DEV_CPUS must be a positive integer, got '$cpus'"
        NODE_LAYOUT="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1"
    else
        # Keep slurmd's own view of the hardware (what it will register with).
        NODE_LAYOUT="$(grep -o -E '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$hw" | paste -s -d ' ')"
        [[ -n "$NODE_LAYOUT" ]] || NODE_LAYOUT="CPUs=$(nproc)"
    fi
}

write_slurm_conf() {
    local accounting_lines
    if [[ "$ACCOUNTING" == 1 ]]; then
        # slurmctld reaches slurmdbd through MUNGE; it takes the socket from AccountingStoragePass.
        accounting_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT_BASE + 3))
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        accounting_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi
    local tmp="$CONF.tmp"
    cat >"$tmp" <<EOF
# Generated by slurm/dev-cluster/start.sh; rewritten at every start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=$RUN_AS
SlurmdUser=$RUN_AS

# A private MUNGE socket; cred_expire=10 because the default 120 s also delays a requeued job's
# restart by two minutes.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10

StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No systemd or cgroups needed: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none

SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Scheduling passes every 2 s (instead of 60 s and 30 s) keep job start latency low.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
JobRequeue=1
# Job ids of their own per cluster (100 apart for port blocks 10 apart): a multi-node job's rendezvous port derives
# from its job id (launch/slurm_script.py), and two clusters on one machine (the test suite's two workers, a user's
# cluster beside the tests') would otherwise give their job N the same port.
FirstJobId=$(( (PORT_BASE - 16800) * 10 ))
ReturnToService=2
# Nodes declare more CPUs than the shared host has; accept that instead of draining them.
SlurmdParameters=config_overrides
# Shorter than the 30 s default so cancelled or preempted test jobs go away quickly.
KillWait=10
InactiveLimit=0
MailProg=/bin/true

$accounting_lines
JobCompType=jobcomp/none

# Two emulated nodes on this host: both slurmd listen on 127.0.0.1, each on its own port (started
# as slurmd -N NAME). Both names resolve, so scontrol show hostnames output works as MASTER_ADDR.
NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=$((PORT_BASE + 1)) $NODE_LAYOUT RealMemory=$NODE_MEM State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 Port=$((PORT_BASE + 2)) $NODE_LAYOUT RealMemory=$NODE_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$tmp" "$CONF"
}

# slurmdbd refuses a config that others can read (it holds the database password).
write_slurmdbd_conf() {
    local pass_file="$ETC/db.pass"
    [[ -s "$pass_file" ]] || (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$pass_file")
    DB_PASS="$(cat "$pass_file")"
    (
        umask 077
        cat >"$ETC/slurmdbd.conf" <<EOF
# Generated by slurm/dev-cluster/start.sh; rewritten at every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT_BASE + 3))
SlurmUser=$RUN_AS
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT_BASE + 4))
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$ETC/slurmdbd.conf"
}

# --- daemons -------------------------------------------------------------------------------------

start_munge() {
    pid_alive "$RUN/munged.pid" munged && return 0
    # munged insists that the socket's directory is not writable by others.
    mkdir -p "$RUN/munge"
    chmod 755 "$RUN/munge"
    if [[ ! -s "$ETC/munge.key" ]]; then
        mungekey --create --keyfile="$ETC/munge.key" >/dev/null 2>&1 ||
            (umask 077 && head -c 1024 /dev/urandom >"$ETC/munge.key")
    fi
    chmod 600 "$ETC/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    spawn "$LOG/munged.log" munged --socket="$MUNGE_SOCKET" --key-file="$ETC/munge.key" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$STATE/munged.seed" ||
        die 1 "munged failed to start (log: $LOG/munged.log)"
    wait_pid "$RUN/munged.pid" munged "$LOG/munged.log"
}

start_mariadb() {
    local datadir="$STATE/mysql" sock="$RUN/mysqld.sock"
    if ! pid_alive "$RUN/mariadbd.pid" mariadbd; then
        if [[ ! -d "$datadir/mysql" ]]; then
            log "initialising MariaDB in $datadir"
            mariadb-install-db --no-defaults --datadir="$datadir" --user="$(id -un)" \
                --auth-root-authentication-method=socket --skip-test-db >>"$LOG/mariadb-install.log" 2>&1 ||
                die 1 "mariadb-install-db failed (log: $LOG/mariadb-install.log)"
        fi
        # --no-defaults: ignore /etc/mysql so a system MariaDB's settings cannot leak in.
        # mariadbd does not daemonize itself: run it in its own session, in the background.
        spawn "$LOG/mariadb.log" setsid mariadbd --no-defaults --datadir="$datadir" --socket="$sock" \
            --port=$((PORT_BASE + 4)) --bind-address=127.0.0.1 --pid-file="$RUN/mariadbd.pid" \
            --log-error="$LOG/mariadb.log" --user="$(id -un)" --skip-name-resolve &
        wait_pid "$RUN/mariadbd.pid" mariadbd "$LOG/mariadb.log"
    fi
    local deadline=$((SECONDS + 30))
    until mariadb --no-defaults --socket="$sock" -u root -e 'SELECT 1' >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die 1 "MariaDB did not accept connections within 30 s (log: $LOG/mariadb.log)"
        sleep 0.5
    done
    # The slurm user reaches MariaDB over TCP on loopback, with the password slurmdbd.conf holds.
    mariadb --no-defaults --socket="$sock" -u root <<EOF || die 1 "could not create the slurm database user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    pid_alive "$RUN/slurmdbd.pid" slurmdbd && return 0
    SLURM_CONF="$CONF" spawn "$LOG/slurmdbd.log" slurmdbd || die 1 "slurmdbd failed (log: $LOG/slurmdbd.log)"
    wait_pid "$RUN/slurmdbd.pid" slurmdbd "$LOG/slurmdbd.log"
    # slurmctld registers the cluster with slurmdbd when it starts; wait until slurmdbd listens.
    local deadline=$((SECONDS + 20))
    until port_in_use $((PORT_BASE + 3)); do
        ((SECONDS < deadline)) || die 1 "slurmdbd is not listening on port $((PORT_BASE + 3)) (log: $LOG/slurmdbd.log)"
        sleep 0.2
    done
}

start_slurmctld() {
    pid_alive "$RUN/slurmctld.pid" slurmctld && return 0
    # -i: ignore state that no longer matches the config (e.g. after SLURM_DEV_CPUS changed).
    SLURM_CONF="$CONF" spawn "$LOG/slurmctld.log" slurmctld -f "$CONF" -i ||
        die 1 "slurmctld failed (log: $LOG/slurmctld.log)"
    wait_pid "$RUN/slurmctld.pid" slurmctld "$LOG/slurmctld.log"
}

start_slurmd() {
    local node="$1"
    pid_alive "$RUN/slurmd-$node.pid" slurmd && return 0
    mkdir -p "$STATE/slurmd-$node"
    SLURM_CONF="$CONF" spawn "$LOG/slurmd-$node.log" slurmd -f "$CONF" -N "$node" ||
        die 1 "slurmd -N $node failed (log: $LOG/slurmd-$node.log)"
    wait_pid "$RUN/slurmd-$node.pid" slurmd "$LOG/slurmd-$node.log"
}

# Poll sinfo until every node has registered and answers. A fresh cluster's nodes are idle; one
# restarted with saved jobs may already be running them (mix/alloc), which is just as usable.
wait_nodes_idle() {
    local deadline=$((SECONDS + TIMEOUT_S)) states
    while :; do
        states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
        if [[ -n "$states" ]] && ! grep -v -E ' (idle|mix|alloc|comp)$' <<<"$states" >/dev/null &&
            [[ "$(wc -l <<<"$states")" -eq ${#NODES[@]} ]]; then
            return 0
        fi
        # A daemon that died (a bad config, a port taken) will not come back: say so now.
        if ! cluster_running; then
            tail -n 5 "$LOG"/*.log >&2 2>/dev/null || true
            die 1 "a daemon exited while the cluster was starting (logs: $LOG)"
        fi
        if ((SECONDS >= deadline)); then
            log "sinfo says: ${states:-nothing (slurmctld not answering)}"
            die 1 "nodes not idle within ${TIMEOUT_S} s (logs: $LOG)"
        fi
        sleep 0.5
    done
}

# Daemons that must be alive for the cluster to count as running.
cluster_running() {
    [[ -s "$CONF" ]] || return 1
    pid_alive "$RUN/munged.pid" munged && pid_alive "$RUN/slurmctld.pid" slurmctld || return 1
    local node
    while read -r node; do
        pid_alive "$RUN/slurmd-$node.pid" slurmd || return 1
    done < <(sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF")
    if grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF"; then
        pid_alive "$RUN/slurmdbd.pid" slurmdbd && pid_alive "$RUN/mariadbd.pid" mariadbd || return 1
    fi
    return 0
}

stop_after_failure() {
    local rc="$1"
    ((rc != 0)) || return 0
    log "stopping the daemons that did start (logs stay in $LOG)"
    SLURM_DEV_DIR="$BASE_DIR" "$SCRIPT_DIR/stop.sh" 9>&- 3>&- || true
}

print_exports() {
    printf 'export SLURM_CONF=%q\n' "$CONF" >&3
    printf 'export SLURM_DEV_DIR=%q\n' "$BASE_DIR" >&3
}

main() {
    ensure_packages
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/slurmctld"
    chmod 755 "$BASE_DIR" "$RUN"

    # Serialise concurrent starts of the same cluster (two test sessions, say).
    exec 9>"$BASE_DIR/.lock"
    flock -w 120 9 || die 1 "another start.sh holds $BASE_DIR/.lock"

    if cluster_running; then
        if [[ "$ACCOUNTING" == 1 ]] && ! grep -q 'accounting_storage/slurmdbd' "$CONF"; then
            log "already running WITHOUT accounting; run stop.sh first to restart it with SLURM_DEV_ACCOUNTING=1"
        fi
        log "already running ($BASE_DIR)"
        print_exports
        return 0
    fi
    # A half-running cluster (a daemon died): stop what is left, then start everything afresh.
    if compgen -G "$RUN/*.pid" >/dev/null; then
        log "restarting a partly running cluster"
        SLURM_DEV_DIR="$BASE_DIR" "$SCRIPT_DIR/stop.sh" 9>&- 3>&- || die 1 "could not stop the partly running cluster"
    fi

    choose_ports
    local port
    for port in $(seq "$PORT_BASE" $((PORT_BASE + 4))); do
        ! port_in_use "$port" || die 1 "port $port on 127.0.0.1 is taken (by another cluster?); set SLURM_DEV_PORT or use stop.sh --purge"
    done
    choose_node_names
    node_layout
    write_slurm_conf
    local started=$SECONDS

    # From here on a failure must not leave half a cluster running: stop what did start (by pid
    # file, as always) and keep the logs.
    trap 'stop_after_failure $?' EXIT

    start_munge
    if [[ "$ACCOUNTING" == 1 ]]; then
        write_slurmdbd_conf
        start_mariadb
        start_slurmdbd
    else
        rm -f "$ETC/slurmdbd.conf"
    fi
    start_slurmctld
    local node
    for node in "${NODES[@]}"; do
        start_slurmd "$node"
    done
    wait_nodes_idle
    log "cluster '$CLUSTER_NAME' up in $((SECONDS - started)) s: nodes ${NODES[*]}, ports $PORT_BASE-$((PORT_BASE + 4)), dir $BASE_DIR"
    print_exports
}

main "$@"
