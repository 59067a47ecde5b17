# Image for the model server (default command) and for the sentinel sidecar (the same
# image running `sentinel run`; see docker-compose.yml and deploy/k8s/deployment.yaml).
# Docker cannot run where this project is developed; the compose tests check the files
# this image is used with, not the build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# constraints.txt pins the CPU build of torch; its wheels come from PyTorch's CPU index.
COPY pyproject.toml constraints.txt README.md ./
COPY sentinel ./sentinel
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt .

# The registry (model.yaml + weights) and golden sets the server and canary read.
COPY models ./models
COPY golden_sets ./golden_sets
COPY slo.yaml sentinel.yaml ./

RUN useradd --system --uid 10001 sentinel
USER 10001
EXPOSE 8081 8080 9464
CMD ["sentinel", "serve", "--model", "digits:v3", "--port", "8081", "--host", "0.0.0.0"]
