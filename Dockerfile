# dicom-node: the same install as README.md (Debian tools + pip install of this package).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk dicom3tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir '.[postgres]' \
    && useradd --system --home /app dicomnode && mkdir -p /data && chown dicomnode /data /app
USER dicomnode
ENV DICOM_NODE_STORAGE_ROOT=/data YOLO_OFFLINE=1 YOLO_CONFIG_DIR=/app/.yolo MPLCONFIGDIR=/app/.yolo/mpl
VOLUME /data
EXPOSE 11112 8480
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8480/readyz', timeout=4)"
STOPSIGNAL SIGTERM
CMD ["dicom-node", "serve", "--config", "/app/config.yaml"]
