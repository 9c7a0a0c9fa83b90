#!/usr/bin/env bash
# A throwaway PostgreSQL server for the `cytopipe serve` tests: `bash .ci/postgres.sh start DIR PORT`
# prints its URL (export it as CYTOPIPE_TEST_POSTGRES_URL); `bash .ci/postgres.sh stop DIR` stops it.
# As root the server runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail
action=${1:-start}
dir=${2:-/tmp/cytopipe-postgres}
port=${3:-54329}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "$action" = stop ]; then
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    exit 0
fi
as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
rm -rf "$dir"
mkdir -p "$dir"
[ "$(id -u)" -eq 0 ] && chown postgres "$dir"
echo cytopipe-test >"$dir/pw" && [ "$(id -u)" -eq 0 ] && chown postgres "$dir/pw"
as_pg "$bin/initdb" -D "$dir/data" -U cytopipe --pwfile="$dir/pw" -A scram-sha-256 >"$dir/initdb.log" 2>&1
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
echo "postgresql://cytopipe:cytopipe-test@127.0.0.1:$port/postgres"
