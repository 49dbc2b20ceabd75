# One image for every streamfuse process (worker, monitor, simulator, topics, ...);
# docker-compose.yml picks the process with the command, e.g. `streamfuse worker`.
#
#   docker build -t streamfuse:latest .                                  # CPU torch
#   docker build --build-arg TORCH_INDEX_URL= -t streamfuse:latest .     # CUDA torch (PyPI)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ...
FROM python:3.11-slim

# PyPI's Linux torch wheels pull in the CUDA runtime (several GB of nvidia-* wheels).
# The CPU wheels of the same release are ~10x smaller, so CPU-only hosts (the demo,
# CI) take them from PyTorch's CPU index. The versions still come from the pins in
# pyproject.toml: `torch==2.11.0` is satisfied by the local version `2.11.0+cpu`, so
# the later `pip install` keeps it. Set this to an empty string to use PyPI's CUDA
# wheels (GPU workers), or to another PyTorch index (e.g. .../whl/cu128).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src

# Dependencies first, in their own layers, so a source change does not reinstall torch.
COPY pyproject.toml README.md ./
COPY deploy/requirements_from_pyproject.py deploy/
# --no-deps: only the three torch packages come from the torch index; their own
# dependencies (numpy, pillow, sympy, ...) are resolved from PyPI in the next step.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        python deploy/requirements_from_pyproject.py --only torch torchvision torchaudio \
            > /tmp/torch-requirements.txt \
        && pip install --no-cache-dir --no-deps --index-url "$TORCH_INDEX_URL" \
            -r /tmp/torch-requirements.txt; \
    fi
RUN python deploy/requirements_from_pyproject.py > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The project itself; its dependencies are already satisfied, `pip check` fails the
# build if the torch index and PyPI disagree.
COPY streamfuse ./streamfuse
RUN pip install --no-cache-dir . \
    && pip check

# Unprivileged runtime user. /models and /data are created (and owned) here so that a
# named volume mounted on them starts out writable by this user: the worker writes the
# demo model bundle to /models on first start when no trained bundle is mounted, and
# the monitor keeps faust's local state under /data (STREAMFUSE_MONITOR__DATA_DIR).
WORKDIR /
RUN rm -rf /src \
    && useradd --system --create-home --home-dir /home/streamfuse --uid 10001 streamfuse \
    && mkdir -p /models /data \
    && chown streamfuse:streamfuse /models /data
ENV STREAMFUSE_MODEL_DIR=/models
USER streamfuse
WORKDIR /home/streamfuse

ENTRYPOINT ["streamfuse"]
CMD ["--help"]
