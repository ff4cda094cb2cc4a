# The needles image: the pipeline, annotation client, model stage and flows, for the compose stack
# (Prefect serve process, the round relay, Ray head and workers). Label Studio runs from its own image.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline pipeline
COPY annotation annotation
COPY model model
COPY flows flows
COPY configs configs
RUN pip install --no-cache-dir -c constraints.txt .
ENV RAY_USAGE_STATS_ENABLED=0
# Ray's token authentication in every container from this image: a head or worker started without
# RAY_AUTH_TOKEN refuses to start rather than accept anyone who can reach it (docker-compose.yml sets it).
ENV RAY_AUTH_MODE=token
