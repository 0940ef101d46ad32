# The example PACS of docs/orthanc (Orthanc 1.10 with its Python and DICOMweb plugins, Debian 12's packages, the
# plugin paths orthanc.json names) for docs/docker/compose.yml. The compose file mounts docs/orthanc at
# /srv/docs/orthanc: orthanc.json finds route_chest_xrays.py relative to the working folder, as on a host.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        orthanc orthanc-python orthanc-dicomweb \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/tmp/dicom-node-example/orthanc /srv/docs/orthanc \
    && chown -R orthanc:orthanc /var/tmp/dicom-node-example
USER orthanc
WORKDIR /srv
# Nagle off in Orthanc's DICOM stack (docs/orthanc/README.md, performance note)
ENV TCP_NODELAY=1
VOLUME /var/tmp/dicom-node-example
CMD ["Orthanc", "docs/orthanc/orthanc.json"]
