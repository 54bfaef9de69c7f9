#!/bin/bash
# Run once by the postgres:15 image on the primary's first start (/docker-entrypoint-initdb.d):
# the roles deploy/config.toml uses, and replication access for the replicas' pg_basebackup.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD 'replicator-secret';
CREATE ROLE monitor WITH LOGIN PASSWORD 'monitor-secret' IN ROLE pg_monitor;
CREATE ROLE app WITH LOGIN PASSWORD 'app-secret';
CREATE DATABASE app OWNER app;
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
