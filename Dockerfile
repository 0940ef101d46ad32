# dicom-node as a container (README, "Docker"):
#
#   docker build -t dicom-node .
#   docker run -d --name dicom-node -p 11112:11112 -p 127.0.0.1:8480:8480 -v dicom-node-data:/data dicom-node
#
# The node runs as the unprivileged user dicomnode with its storage root (spool, results, SQLite, audit trail) in
# the volume /data, on /app/config.yaml: the repository's config.yaml, except that the web server listens on all of
# the container's interfaces (publish it on 127.0.0.1, or behind a proxy). Mount your own config over it
# (-v ./config.yaml:/app/config.yaml:ro). The default models ship inside the image.
#
# Build arguments:
#   BASE_IMAGE       a Debian bookworm image with Python 3.11: the public python:3.11-slim-bookworm, or one with
#                    Debian's python3 and python3-venv (tests/support/docker_base.sh makes one for machines that
#                    reach no registry; it has /usr/bin/python3 only, hence python3 and the venv below)
#   TORCH_INDEX_URL  where torch and torchvision come from: PyTorch's CPU-only index by default (the node runs on
#                    the CPU, inference.models.device: cpu); empty = PyPI's CUDA build (several GB more, for
#                    device: cuda with the NVIDIA container toolkit)
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The dependency list alone (project.dependencies and the postgres extra), so that editing the code or the rest of
# pyproject.toml does not reinstall the dependencies.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > /tmp/requirements.txt

# System libraries and the Python dependencies.
FROM ${BASE_IMAGE} AS dependencies
# opencv-python (required by the node and by ultralytics, so not the headless wheel) links libGL, GLib and libxcb,
# which slim images lack. No dcmtk: pynetdicom's apps do the same inside (python -m pynetdicom echoscu HOST PORT).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libgl1 libglib2.0-0 libxcb1 \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --upgrade pip \
    && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch torchvision; fi
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# The package itself (a regular, non-editable install; the models go to /opt/venv/share/dicom-node/models).
FROM dependencies AS package
COPY . /src
RUN pip install --no-deps --prefix /install /src

FROM dependencies
COPY --from=package /install/ /opt/venv/
COPY config.yaml /app/config.yaml
RUN sed -i -E 's/^(  host: )127\.0\.0\.1( |$)/\10.0.0.0\2/' /app/config.yaml \
    && python -c "import yaml; c = yaml.safe_load(open('/app/config.yaml')); \
assert c['web']['host'] == '0.0.0.0' and c['node']['host'] == '0.0.0.0', 'config.yaml: web.host not rewritten'" \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/dicomnode dicomnode \
    && mkdir -p /data && chown dicomnode:dicomnode /data
USER dicomnode
WORKDIR /app
ENV DICOM_NODE_STORAGE_ROOT=/data \
    YOLO_OFFLINE=1 \
    YOLO_CONFIG_DIR=/home/dicomnode/.yolo \
    MPLCONFIGDIR=/home/dicomnode/.matplotlib \
    PYTHONUNBUFFERED=1
VOLUME /data
# DICOM (node.port), and the web server: console, /healthz, /readyz, /metrics (web.port)
EXPOSE 11112 8480
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8480/readyz', timeout=4)"
STOPSIGNAL SIGTERM
CMD ["dicom-node", "serve", "--config", "/app/config.yaml"]
