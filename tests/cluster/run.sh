#!/usr/bin/env bash
# Issue #12: Ultra on a three-node RabbitMQ cluster, with the node that leads the work
# queue stopped mid-run and started again.
#
# Starts three RabbitMQ nodes of its own on this host (ultra-c1..3@localhost, AMQP on
# 127.0.0.1:5701..5703, everything under one temporary directory, an Erlang cookie of
# their own so nothing here can reach the machine's shared node), clusters them, runs
# 1,000 two-model jobs through `ultra all` plus a second `ultra worker`, stops the
# leader of `<prefix>ultra.analyze` with `rabbitmqctl stop_app` while jobs run, starts
# it again, and audits the database: every job succeeded, once, no step completed
# twice, the outbox is empty. Prints one summary line; exits non-zero on any failure.
#
#   ULTRA_BIN=target/debug/ultra tests/cluster/run.sh      # the whole run
#   tests/cluster/run.sh --cluster-only                    # start, cluster, stop the nodes
#
# Needs: the Debian rabbitmq-server package (its scripts in /usr/lib/rabbitmq/bin, or
# RABBITMQ_SCRIPTS), PostgreSQL on 127.0.0.1:5432 (user postgres, trust) with psql,
# Redis, curl. Everything it starts is stopped by pid on exit, its database dropped and
# its directory deleted; the shared broker (rabbit@localhost, :5672) is never touched.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"

mode=full
case "${1:-}" in
  "") ;;
  --cluster-only) mode=cluster ;;
  *) echo "usage: $0 [--cluster-only]" >&2; exit 2 ;;
esac

ULTRA_BIN="${ULTRA_BIN:-${CARGO_TARGET_DIR:-target}/debug/ultra}"
RABBITMQ_SCRIPTS="${RABBITMQ_SCRIPTS:-/usr/lib/rabbitmq/bin}"
JOBS="${CLUSTER_JOBS:-1000}"
# Slow enough mock calls and few enough slots that the run lasts ~30 s: the leader is
# stopped while jobs are in flight, not after they are done.
MOCK_LATENCY_MS="${CLUSTER_MOCK_LATENCY_MS:-500}"
CONCURRENCY="${CLUSTER_CONCURRENCY:-8}"
# The leader is stopped once this many jobs have ended, and kept down this long.
STOP_AFTER=$((JOBS / 8))
DOWN_SECONDS="${CLUSTER_DOWN_SECONDS:-10}"
DRAIN_TIMEOUT="${CLUSTER_DRAIN_TIMEOUT:-150}"
PSQL=(psql -h 127.0.0.1 -U postgres -X -q -v ON_ERROR_STOP=1)

NODES=(ultra-c1@localhost ultra-c2@localhost ultra-c3@localhost)
PORTS=(5701 5702 5703)

run_id="$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
work="$(mktemp -d "${TMPDIR:-/tmp}/ultra-cluster.XXXXXX")"
database="ultra_cluster_${run_id}"
started_at=$SECONDS

node_pids=() # the rabbitmq-server scripts (each waits on its Erlang VM)
ultra_pids=()
submitter="" # xargs, submitting with curl
database_made=false

say() { printf '[cluster %3ds] %s\n' $((SECONDS - started_at)) "$*" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}

# --- RabbitMQ nodes -----------------------------------------------------------------

# rabbitmqctl against one of this run's nodes, with this run's cookie ($work is HOME).
# The Debian wrapper in /usr/sbin would switch to the rabbitmq user and its cookie.
ctl() { # node args...
  local node="$1"
  shift
  HOME="$work" RABBITMQ_CONF_ENV_FILE="$work/no-env-file" \
    "$RABBITMQ_SCRIPTS/rabbitmqctl" -q -n "$node" "$@" </dev/null
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts node $1 (0-based) in the background; its log goes to $work/cN/.
start_node() {
  local i="$1" dir="$work/c$(($1 + 1))"
  mkdir -p "$dir/mnesia" "$dir/log"
  # Not /etc/rabbitmq/rabbitmq.conf: that one binds the shared node's port.
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:${PORTS[i]}
loopback_users.guest = true
consumer_timeout = 7200000
EOF
  (
    export HOME="$work" \
      RABBITMQ_CONF_ENV_FILE="$work/no-env-file" \
      RABBITMQ_NODENAME="${NODES[i]}" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="${PORTS[i]}" \
      RABBITMQ_DIST_PORT=$((PORTS[i] + 20000)) \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
      RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$work/enabled_plugins" \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" \
      RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_PID_FILE="$dir/pid" \
      ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    exec "$RABBITMQ_SCRIPTS/rabbitmq-server"
  ) >"$dir/server.out" 2>&1 &
  node_pids+=("$!")
}

start_cluster() {
  local t0=$SECONDS port
  for port in "${PORTS[@]}" $((PORTS[0] + 20000)) $((PORTS[1] + 20000)) $((PORTS[2] + 20000)); do
    port_in_use "$port" && fail "port $port is in use (a node left by an interrupted run?)"
  done
  umask 077
  od -An -N20 -tx1 /dev/urandom | tr -d ' \n' >"$work/.erlang.cookie"
  chmod 400 "$work/.erlang.cookie"
  echo '[].' >"$work/enabled_plugins" # no management or prometheus listeners
  umask 022
  for i in 0 1 2; do start_node "$i"; done
  for i in 0 1 2; do
    # `wait` watches the pid file the node writes as it boots, then its start-up.
    ctl "${NODES[i]}" --timeout 120 wait "$work/c$((i + 1))/pid" >/dev/null ||
      fail "${NODES[i]} did not start (see $work/c$((i + 1))/)"
  done
  for i in 1 2; do
    ctl "${NODES[i]}" stop_app
    ctl "${NODES[i]}" join_cluster "${NODES[0]}"
    ctl "${NODES[i]}" start_app
  done
  ctl "${NODES[0]}" --timeout 60 await_online_nodes 3 || fail "the three nodes did not form a cluster"
  cluster_start_seconds=$((SECONDS - t0))
  say "cluster of ${NODES[*]} up in ${cluster_start_seconds} s"
}

# A node's Erlang VM, from its pid file (written once the node has booted).
beam_pid() { cat "$work/c$(($1 + 1))/pid" 2>/dev/null || true; }

# Waits up to $2 seconds for process $1 (already asked to stop) to exit; true if it did.
exited_within() {
  local _
  for _ in $(seq 1 $(($2 * 2))); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.5
  done
  ! kill -0 "$1" 2>/dev/null
}

stop_cluster() {
  local i pid beam
  for i in "${!node_pids[@]}"; do
    pid="${node_pids[i]}"
    beam="$(beam_pid "$i")"
    kill -TERM "$pid" 2>/dev/null || true # the script stops its VM, then exits
    if ! exited_within "$pid" 30; then
      if [[ -n "$beam" ]]; then kill -KILL "$beam" 2>/dev/null || true; fi
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  node_pids=()
}

# --- Ultra --------------------------------------------------------------------------

free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 20000))
    port_in_use "$port" || {
      echo "$port"
      return
    }
  done
}

amqp_list() { # node indexes, in the order the process should try them
  local i list=""
  for i in "$@"; do list+="${list:+,}amqp://guest:guest@127.0.0.1:${PORTS[i]}/%2f"; done
  echo "$list"
}

ultra_env() {
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database" \
    REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}" \
    ULTRA_QUEUE_PREFIX="c${run_id}." \
    ULTRA_REDIS_PREFIX="ultra-c${run_id}" \
    ULTRA_CONFIG_FILE="$work/ultra.toml" \
    ULTRA_MOCK_LATENCY_MS="$MOCK_LATENCY_MS" \
    ULTRA_WORKER_CONCURRENCY="$CONCURRENCY" \
    ULTRA_SHUTDOWN_GRACE_SECS=5 \
    ULTRA_LOG_FORMAT=json \
    RUST_LOG="info,sqlx=warn,lapin=warn"
  unset ULTRA_METRICS_TOKEN ULTRA_ENV
}

# A tier whose limits a run never reaches (`bench`), and mock models without
# concurrency caps: the benchmarks' own configuration.
write_ultra_config() {
  cp "$repo/bench/src/limitless.toml" "$work/ultra.toml"
}

start_ultra() { # mode VAR=value...: `ultra <mode>` with these variables too, logging to $work
  local mode="$1"
  shift
  env "$@" "$ULTRA_BIN" "$mode" >"$work/ultra-$mode.log" 2>&1 </dev/null &
  ultra_pids+=("$!")
  say "started ultra $mode (pid $!)"
}

wait_http() { # url seconds
  for _ in $(seq 1 $(($2 * 5))); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.2
  done
  return 1
}

sql() { "${PSQL[@]}" -d "$database" -At -F ' ' -c "$1"; }

ended_jobs() { sql "SELECT count(*) FROM jobs WHERE status NOT IN ('queued', 'running')"; }

# The node that leads the work queue, as the cluster reports it.
analyze_leader() {
  ctl "${NODES[$1]}" list_queues name leader --no-table-headers 2>/dev/null |
    awk -v q="c${run_id}.ultra.analyze" '$1 == q { print $2 }'
}

stop_ultra() {
  local pid
  if [[ -n "$submitter" ]]; then
    kill -TERM "$submitter" 2>/dev/null || true
    wait "$submitter" 2>/dev/null || true
    submitter=""
  fi
  for pid in "${ultra_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${ultra_pids[@]}"; do
    exited_within "$pid" 20 || kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  ultra_pids=()
}

show_logs() {
  local f
  for f in "$work"/ultra-*.log; do
    [[ -f "$f" ]] || continue
    echo "--- last lines of $f" >&2
    tail -n 15 "$f" >&2
  done
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [[ $status -ne 0 && "$mode" == full ]] && show_logs
  stop_ultra
  stop_cluster
  if $database_made; then
    "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 ||
      echo "warning: could not drop database $database" >&2
  fi
  if [[ $status -ne 0 && -n "${CLUSTER_KEEP_LOGS:-}" ]]; then
    echo "logs kept in $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the run ------------------------------------------------------------------------

[[ -x "$RABBITMQ_SCRIPTS/rabbitmq-server" ]] || fail "no RabbitMQ scripts in $RABBITMQ_SCRIPTS (set RABBITMQ_SCRIPTS)"
if [[ "$mode" == full ]]; then
  [[ -x "$ULTRA_BIN" ]] || fail "no ultra binary at $ULTRA_BIN (build it, or set ULTRA_BIN)"
  for tool in psql curl; do command -v "$tool" >/dev/null || fail "needs $tool"; done
fi

start_cluster
if [[ "$mode" == cluster ]]; then
  running="$(ctl "${NODES[0]}" cluster_status --formatter json | tr -d '\n' |
    grep -o '"running_nodes":\[[^]]*\]' || true)"
  say "cluster-only: ${running:-running_nodes unknown}"
  exit 0
fi

write_ultra_config
ultra_env
export AMQP_URL
AMQP_URL="$(amqp_list 0 1 2)"
database_made=true # the admin commands create it
email="cluster-${run_id}@example.com"
"$ULTRA_BIN" admin create-user --email "$email" >/dev/null
"$ULTRA_BIN" admin set-tier --email "$email" --tier bench >/dev/null
key="$("$ULTRA_BIN" admin create-api-key --email "$email" --name cluster | tail -n 1)"

api_port="$(free_port)"
api="http://127.0.0.1:$api_port"
# `ultra all` tries the nodes from the first, the second worker from the second: one
# process loses its connection with the leader, the other keeps consuming through a
# follower while the queue elects a new leader.
start_ultra all ULTRA_LISTEN="127.0.0.1:$api_port"
wait_http "$api/health/live" 60 || fail "ultra all did not answer on $api"
start_ultra worker AMQP_URL="$(amqp_list 1 2 0)" ULTRA_WORKER_LISTEN="127.0.0.1:$(free_port)"

leader="$(analyze_leader 0)"
for _ in $(seq 1 50); do
  [[ -n "$leader" ]] && break
  sleep 0.2
  leader="$(analyze_leader 0)"
done
[[ -n "$leader" ]] || fail "c${run_id}.ultra.analyze has no leader"

# Submit in the background, 16 at a time; each line of $work/codes is one HTTP status.
body='{"prompt": "Cluster test: why is the sky blue?", "models": ["mock/alpha", "mock/beta"]}'
# shellcheck disable=SC2016 # $1..$3 are sh's arguments, expanded there
seq 1 "$JOBS" | xargs -P 16 -n 1 sh -c 'curl -s -o /dev/null -w "%{http_code}\n" --max-time 30 \
  -H "Authorization: Bearer $1" -H "Content-Type: application/json" -d "$2" "$3/v1/analyze"' _ "$key" "$body" "$api" \
  >"$work/codes" 2>/dev/null &
submitter=$!
say "submitting $JOBS jobs; ${leader} leads c${run_id}.ultra.analyze"

for _ in $(seq 1 600); do
  [[ "$(ended_jobs)" -ge "$STOP_AFTER" ]] && break
  sleep 0.1
done
[[ "$(ended_jobs)" -ge "$STOP_AFTER" ]] || fail "fewer than $STOP_AFTER jobs ended in 60 s"
ended_before="$(ended_jobs)"
say "stop_app $leader ($ended_before jobs ended)"
ctl "$leader" stop_app
sleep "$DOWN_SECONDS"
ended_down=$(($(ended_jobs) - ended_before))
survivor=0
[[ "$leader" == "${NODES[0]}" ]] && survivor=1
new_leader="$(analyze_leader "$survivor")"
say "start_app $leader ($ended_down jobs ended while it was down; new leader ${new_leader:-none})"
ctl "$leader" start_app
ctl "$leader" --timeout 60 await_startup

wait "$submitter" || true # a failed curl shows as 000 below
submitter=""
accepted="$(grep -c '^202$' "$work/codes" || true)"
[[ "$accepted" -eq "$JOBS" ]] ||
  fail "only $accepted of $JOBS submissions were accepted: $(sort "$work/codes" | uniq -c | tr '\n' ' ')"

# Drained: every job ended and every outbox row published.
drained=false
for _ in $(seq 1 "$DRAIN_TIMEOUT"); do
  if [[ "$(sql "SELECT (SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')),
                       (SELECT count(*) FROM outbox)")" == "0 0" ]]; then
    drained=true
    break
  fi
  sleep 1
done
$drained || fail "jobs still unfinished after ${DRAIN_TIMEOUT} s: $(sql "SELECT status, count(*) FROM jobs GROUP BY 1" | tr '\n' ' ')"

# The audit of testkit/src/audit.rs, plus jobs without a terminal event.
read -r jobs unfinished not_succeeded duplicate_results repeated_steps outbox_left no_result < <(sql "SELECT
   (SELECT count(*) FROM jobs),
   (SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')),
   (SELECT count(*) FROM jobs WHERE status IN ('failed', 'cancelled')),
   (SELECT count(*) FROM (SELECT job_id FROM job_events
                           WHERE kind IN ('succeeded', 'failed', 'cancelled')
                           GROUP BY job_id HAVING count(*) > 1) d),
   (SELECT count(*) FROM (SELECT job_id FROM job_events WHERE kind = 'step.completed'
                           GROUP BY job_id, data->>'stage', data->>'model' HAVING count(*) > 1) r),
   (SELECT count(*) FROM outbox),
   (SELECT count(*) FROM jobs j WHERE NOT EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = j.id
                                                   AND e.kind IN ('succeeded', 'failed', 'cancelled')))")

summary="jobs=$jobs unfinished=$unfinished not_succeeded=$not_succeeded duplicate_results=$duplicate_results"
summary+=" repeated_steps=$repeated_steps outbox_left=$outbox_left no_terminal_event=$no_result"
[[ "$jobs" -eq "$JOBS" && "$unfinished" -eq 0 && "$not_succeeded" -eq 0 && "$duplicate_results" -eq 0 &&
  "$repeated_steps" -eq 0 && "$outbox_left" -eq 0 && "$no_result" -eq 0 ]] || fail "audit: $summary"
[[ "$ended_down" -gt 0 ]] || fail "no job ended while $leader was down: the processes did not fail over ($summary)"

# Evidence of failing over, from the processes' own logs.
moved="$(cat "$work"/ultra-*.log | grep -c 'connected to another RabbitMQ node' || true)"
echo "cluster: $JOBS jobs succeeded once through a 3-node cluster; $leader (analyze leader) stopped" \
  "for ${DOWN_SECONDS} s after $ended_before ended, $ended_down ended meanwhile, $moved connections moved to" \
  "another node; 0 repeated steps, 0 duplicate results, outbox empty; cluster up in ${cluster_start_seconds} s," \
  "whole run $((SECONDS - started_at)) s"
