#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the test suite (Debian's `postgresql`).
#
#   .ci/postgres.sh start   initdb into a fresh temp dir, start it on 127.0.0.1
#                           (a free port; the unix socket stays in the temp dir),
#                           create an empty database, print its URL on stdout
#   .ci/postgres.sh stop    stop that cluster and remove its directory
#
# Runs the server as the `postgres` user when started as root (initdb refuses
# root), as the current user otherwise. Trust auth, loopback only, durability
# off: it holds nothing worth keeping. A cluster left over by an earlier start
# is stopped first, so every start gives a clean database.
set -euo pipefail

STATE="${INTAKE_PG_STATE:-${TMPDIR:-/tmp}/intake-ci-postgres.state}"  # holds the cluster's directory
DB_NAME="${INTAKE_PG_DB:-intake_test}"

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  d=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
  [ -x "$d/initdb" ] || { echo "postgres.sh: no initdb found (apt-get install postgresql)" >&2; exit 1; }
  echo "$d"
}

as_owner() {
  # From / : the server user may not be allowed into the checkout.
  if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop() {
  [ -f "$STATE" ] || return 0
  local dir
  dir=$(cat "$STATE")
  if [ -n "$dir" ] && [ -d "$dir/data" ]; then
    as_owner "$(pg_bin)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  case "$dir" in */intake-pg.*) rm -rf "$dir" ;; esac
  rm -f "$STATE"
}

start() {
  stop  # a cluster from an earlier run: gone, so the database starts empty
  local bin dir port user url
  bin=$(pg_bin)
  dir=$(mktemp -d "${TMPDIR:-/tmp}/intake-pg.XXXXXX")
  echo "$dir" >"$STATE"
  if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; user=postgres; else user=$(id -un); fi
  chmod 700 "$dir"
  as_owner "$bin/initdb" -D "$dir/data" -U "$user" --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c fsync=off \
            -c synchronous_commit=off -c full_page_writes=off" >/dev/null; then
      break
    fi
    port=""
  done
  [ -n "$port" ] || { tail -n 20 "$dir/server.log" >&2; exit 1; }
  # Drop/create even on a fresh cluster: the database is empty whatever happened before.
  PGOPTIONS="-c client_min_messages=warning" as_owner "$bin/dropdb" -h "$dir" -p "$port" -U "$user" --if-exists "$DB_NAME"
  as_owner "$bin/createdb" -h "$dir" -p "$port" -U "$user" "$DB_NAME"
  url="postgresql://$user@127.0.0.1:$port/$DB_NAME"
  echo "$url" >"$dir/url"
  echo "$url"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
