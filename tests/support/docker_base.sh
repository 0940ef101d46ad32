#!/usr/bin/env bash
# Build a local Debian bookworm base image for the Dockerfile's BASE_IMAGE, from Debian packages only (mmdebstrap
# piped into `docker import`), for machines that reach no image registry (CI). Users build on the public
# python:3.11-slim-bookworm, the Dockerfile's default; this base stands in for it: Debian's python3 (3.11) with
# python3-venv, ca-certificates, and this machine's extra CA certificates (/usr/local/share/ca-certificates, e.g.
# a TLS-inspecting egress proxy's), so that apt and pip inside the image build reach their servers as the host
# does. Nothing secret goes in: CA certificates are public.
#
# Idempotent: does nothing when the image exists (DICOM_NODE_DOCKER_BASE_REBUILD=1 rebuilds it).
# Prints the image name on its last line. Needs root, docker and mmdebstrap (apt-get install docker.io mmdebstrap).
#
#   bash tests/support/docker_base.sh                  # -> dicom-node-base:bookworm
#   docker build --build-arg BASE_IMAGE=dicom-node-base:bookworm -t dicom-node .
set -euo pipefail

IMAGE="${DICOM_NODE_DOCKER_BASE:-dicom-node-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

if [[ "${DICOM_NODE_DOCKER_BASE_REBUILD:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "docker_base: $IMAGE exists (DICOM_NODE_DOCKER_BASE_REBUILD=1 rebuilds it)" >&2
    echo "$IMAGE"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "docker_base: mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }

hooks=()
shopt -s nullglob
certs=(/usr/local/share/ca-certificates/*.crt)
if ((${#certs[@]})); then
    hooks+=(--customize-hook="copy-in ${certs[*]} /usr/local/share/ca-certificates/")
fi
hooks+=(--customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null 2>&1')

start=$(date +%s)
# minbase (essential + apt) as debian:bookworm-slim; documentation left out as there
mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "${hooks[@]}" \
    bookworm - \
    "deb $MIRROR bookworm main" \
    "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY bookworm-security main" |
    docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        - "$IMAGE" >/dev/null
echo "docker_base: built $IMAGE in $(($(date +%s) - start)) s" >&2
echo "$IMAGE"
