#!/usr/bin/env bash
# A PostgreSQL database for the storage tests: installs the server when missing (Debian/Ubuntu),
# starts its first cluster, makes sure a password-protected role and database exist, and prints
# their DSN (postgresql://USER:PASSWORD@127.0.0.1:PORT/DB) as the only line on stdout. Safe to run
# again: every step checks first. Everything else it says goes to stderr: the set-up runs in a group
# whose stdout is stderr, so the server it starts holds no copy of stdout, and a caller reading the
# DSN with $(...) is not left waiting for the daemon to close it.
set -euo pipefail

ROLE="${AUTOPRUNE_PG_ROLE:-autoprune}"
DB="${AUTOPRUNE_PG_DB:-autoprune}"
PASSWORD="${AUTOPRUNE_PG_PASSWORD:-autoprune-ci-Pa55}"
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)

{
if ! command -v pg_lsclusters >/dev/null; then
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -y update
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -y install postgresql >/dev/null
fi
if [ -z "$(pg_lsclusters -h)" ]; then
  "${SUDO[@]}" pg_createcluster "$(ls /usr/lib/postgresql | sort -V | tail -1)" main
fi
read -r VERSION CLUSTER PORT STATUS _ < <(pg_lsclusters -h | head -1)
if [ "$STATUS" != online ]; then
  "${SUDO[@]}" pg_ctlcluster "$VERSION" "$CLUSTER" start
fi

psql_admin() { "${SUDO[@]}" runuser -u postgres -- psql -p "$PORT" -v ON_ERROR_STOP=1 -qtA "$@"; }
for _ in $(seq 30); do psql_admin -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
if [ -z "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" ]; then
  psql_admin -c "CREATE ROLE \"$ROLE\" LOGIN"
fi
psql_admin -c "ALTER ROLE \"$ROLE\" PASSWORD '$PASSWORD'"
if [ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
  psql_admin -c "CREATE DATABASE \"$DB\" OWNER \"$ROLE\""
fi
} >&2

echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
