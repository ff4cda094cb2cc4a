#!/bin/bash
# Label Studio gets its own database on the shared Postgres (Prefect uses POSTGRES_DB).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -c "CREATE DATABASE ${LABEL_STUDIO_DB:-labelstudio};"
