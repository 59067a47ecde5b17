# Two images from one file:
#   docker build --target sidecar -t sentinel-densenet-sidecar:dev .   # `sentinel run` (and replay,
#       rules, dashboards, gpu): base dependencies only, no torch, kserve or scikit-learn
#   docker build -t sentinel-densenet:dev .                            # the `full` target (default):
#       + torch (CPU build) and kserve, for `sentinel serve` (the model server) and export/verify
# The sidecar's shadow reference and embeddings run the registry's ONNX features export on
# onnxruntime, so the sidecar image needs no torch. See README "Installing" for measured sizes.
# Docker cannot run where this project is developed; the compose tests check the files
# these images are used with, not the build.
FROM python:3.11-slim AS source

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# setup.py copies models/, golden_sets/, slo.yaml and sentinel.yaml into the wheel; the same
# folders also stay under /app, where deploy/k8s and docker-compose point the config.
COPY pyproject.toml setup.py MANIFEST.in constraints.txt README.md slo.yaml sentinel.yaml ./
COPY sentinel ./sentinel
COPY models ./models
COPY golden_sets ./golden_sets
RUN useradd --system --uid 10001 sentinel

FROM source AS sidecar
# nginx for `proxy.engine: nginx` (README "nginx engine"); sentinel's own proxy needs nothing
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light && rm -rf /var/lib/apt/lists/*
RUN pip install -c constraints.txt . && rm -rf build *.egg-info
USER 10001
# 8080 proxy, 8001 OIP v2 gRPC (when grpc_listen is set), 9464 admin (/metrics, /healthz, /readyz).
# Nothing is fetched at run time: the registry, golden sets and ONNX exports are in /app.
EXPOSE 8080 8001 9464
CMD ["sentinel", "run", "--config", "/etc/sentinel/sentinel.yaml"]

FROM source AS full
# constraints.txt pins torch; PyTorch's CPU index serves its CPU build (no CUDA libraries).
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt ".[full]" \
    && rm -rf build *.egg-info
USER 10001
EXPOSE 8081 8082
CMD ["sentinel", "serve", "--model", "digits:v3", "--port", "8081", "--host", "0.0.0.0"]
