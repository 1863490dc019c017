# riskwatch worker image: docker build -t riskwatch . && docker run riskwatch (runs `riskwatch worker`).
# BASE: any Debian-like image with Python 3.11+ and its venv module; an argument so that a machine
# that cannot pull python:3.11-slim builds from a local one (README, "Containers without Docker").
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/riskwatch
COPY . .
# A virtualenv: a Debian base's own Python refuses `pip install` into it (PEP 668).
# Without the `report` extra: the worker draws no plots and reads no Parquet.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install . \
    && useradd --system --create-home --uid 10001 riskwatch \
    && mkdir -p /var/lib/riskwatch \
    && chown riskwatch /var/lib/riskwatch

# The default rule and plan catalogues ship inside the package; RISKWATCH_RULES_FILE and
# RISKWATCH_PLANS_FILE point elsewhere (Kubernetes mounts them from ConfigMaps).
ENV PATH=/opt/venv/bin:$PATH \
    RISKWATCH_KAFKA_BOOTSTRAP=kafka:9092 \
    RISKWATCH_WEB_HOST=0.0.0.0 \
    RISKWATCH_DATA_DIR=/var/lib/riskwatch

USER riskwatch
# 9108: Prometheus /metrics (RISKWATCH_METRICS_PORT); 6066: web server (RISKWATCH_WEB_PORT).
EXPOSE 9108 6066
CMD ["riskwatch", "worker"]
