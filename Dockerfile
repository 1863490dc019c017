# riskwatch worker image: docker build -t riskwatch . && docker run riskwatch (runs `riskwatch worker`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/riskwatch
COPY . .
# Without the `report` extra: the worker draws no plots and reads no Parquet.
RUN pip install . \
    && useradd --system --create-home --uid 10001 riskwatch \
    && mkdir -p /var/lib/riskwatch \
    && chown riskwatch /var/lib/riskwatch

# The default rule and plan catalogues ship inside the package; RISKWATCH_RULES_FILE and
# RISKWATCH_PLANS_FILE point elsewhere (Kubernetes mounts them from ConfigMaps).
ENV RISKWATCH_KAFKA_BOOTSTRAP=kafka:9092 \
    RISKWATCH_WEB_HOST=0.0.0.0 \
    RISKWATCH_DATA_DIR=/var/lib/riskwatch

USER riskwatch
# 9108: Prometheus /metrics (RISKWATCH_METRICS_PORT); 6066: web server (RISKWATCH_WEB_PORT).
EXPOSE 9108 6066
CMD ["riskwatch", "worker"]
