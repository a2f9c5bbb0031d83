# Shared by the bench scripts that need a control plane and one agent (sourced, not run):
# stop_pid, launch_server, start_control_plane, start_agent.
# The caller defines log(), $work (a scratch folder), $server_bin and $agent_bin, and cleans
# up $server_pid and $agent_pid on exit.

# Stops a process: SIGTERM, up to SECONDS (10), then SIGKILL.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((${2:-10} * 10))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM for ${2:-10} s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# launch_server DIR: `outpost server` on a free loopback port with data in DIR/server and its
# log in DIR/server.log; waits for it; sets url and server_pid and exports OUTPOST_SERVER and
# OUTPOST_TOKEN for the CLI.
launch_server() {
  local dir=$1
  "$server_bin" server --listen 127.0.0.1:0 --data "$dir/server" --insecure-http \
    >"$dir/server.log" 2>&1 &
  server_pid=$!
  url=""
  for _ in $(seq 1 100); do
    url=$(sed -n 's/.*listening on \(http:\/\/127\.0\.0\.1:[0-9]*\).*/\1/p' "$dir/server.log" |
      head -n 1)
    if [ -n "$url" ] && [ -s "$dir/server/admin.token" ]; then break; fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    url=""
    sleep 0.1
  done
  [ -n "$url" ] || { log "the server did not start within 10 s"; cat "$dir/server.log" >&2; exit 1; }
  export OUTPOST_SERVER=$url
  OUTPOST_TOKEN=$(cat "$dir/server/admin.token")
  export OUTPOST_TOKEN
}

# start_control_plane SITE USES: launch_server in $work, then an enrollment token for SITE
# (USES uses) in enroll_token.
start_control_plane() {
  launch_server "$work"
  enroll_token=$("$server_bin" token create --site "$1" --uses "$2" 2>"$work/token.err")
  log "control plane $url (pid $server_pid)"
}

# start_agent: enrolls `outpost-agent` with $enroll_token, data in $work/agent, local API on
# a free port; sets agent_pid and agent_addr.
start_agent() {
  "$agent_bin" --server "$url" --enroll-token "$enroll_token" --data "$work/agent" \
    --listen 127.0.0.1:0 >"$work/agent.log" 2>&1 &
  agent_pid=$!
  for _ in $(seq 1 300); do
    [ -s "$work/agent/agent.addr" ] && break
    kill -0 "$agent_pid" 2>/dev/null || { log "the agent exited:"; cat "$work/agent.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -s "$work/agent/agent.addr" ] || { log "no agent.addr within 30 s"; cat "$work/agent.log" >&2; exit 1; }
  agent_addr=$(cat "$work/agent/agent.addr")
  log "agent pid $agent_pid, local API $agent_addr"
}
