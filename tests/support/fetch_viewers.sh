#!/usr/bin/env bash
# Fetch the web viewers that tests/support/viewers.py drives (OHIF Viewer, dwv and dwv's three
# dependencies) from the npm registry, at pinned versions, into .viewers/ (gitignored; override
# with DICOM_NODE_VIEWERS_DIR). Nothing of them is copied into the repository, and nothing is
# downloaded while the tests run: call this once at set-up (README, CI) before pytest.
#
#   bash tests/support/fetch_viewers.sh        # idempotent: a package already there at its pin is kept
#
# Each package is `npm pack`ed (the registry tarball, no install scripts run), its sha512 checked
# against the pin below, and unpacked into .viewers/<name>/ (the tarball's package/ folder: OHIF's
# static build is .viewers/ohif/dist, dwv's ES module .viewers/dwv/dist/dwv.min.js).
# Needs: npm, tar, python3 (to read package.json). Takes ~15 s and ~260 MB (OHIF's build is 204 MB).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${DICOM_NODE_VIEWERS_DIR:-$REPO/.viewers}"

# folder   npm spec                sha512 integrity (npm view <spec> dist.integrity)
PINS=(
  "ohif            @ohif/app@3.13.2        sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
  "dwv             dwv@0.36.4              sha512-kXGlujGcCKSJD6s0THa2z4Kn/aVCdltvbgrn8g2WcTA8TgLZJHp6Z0Tbu3gxkerIaMCrTC4TbaWJI0nq9tPAFg=="
  "konva           konva@10.2.0            sha512-JBoz0Xjbf49UPxCZegZ4WseqOzJ+C4AUDOtJ9eBve5RS5Fcq/u8TdBD5fDl/uPFInpC3a9uycm0sRyZpF4hheg=="
  "jszip           jszip@3.10.1            sha512-xXDvecyTpGLrqFrvkrUSoxxfJI5AH7U8zxxtVclpsUtMCq4JQ290LY8AW5c7Ggnr/Y/oK+bQMbqK2qmtk3pN4g=="
  "magic-wand-tool magic-wand-tool@1.1.7   sha512-S4rHzCs/bAp7nhQGKeg+McWuqrdyZKpnu8Ahd8AU7NzuLTm/Hh8tkpv1tW91Kmm59foIrXzip1d+P9NDoyxrZA=="
)

command -v npm >/dev/null || { echo "fetch_viewers.sh: npm is missing (Debian: apt-get install -y nodejs npm)" >&2; exit 1; }
mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

installed_version() {  # version in <folder>/package.json, or nothing
  [ -f "$1/package.json" ] && python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$1/package.json"
}

for pin in "${PINS[@]}"; do
  read -r folder spec integrity <<<"$pin"
  version="${spec##*@}"
  target="$DEST/$folder"
  if [ "$(installed_version "$target" || true)" = "$version" ]; then
    echo "fetch_viewers.sh: $spec already in $target"
    continue
  fi
  echo "fetch_viewers.sh: fetching $spec"
  meta="$(cd "$WORK" && npm pack --json --silent "$spec")"
  got="$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])[0]; print(d["filename"], d["integrity"])' "$meta")"
  read -r tarball got_integrity <<<"$got"
  if [ "$got_integrity" != "$integrity" ]; then
    echo "fetch_viewers.sh: $spec: integrity $got_integrity, pinned $integrity" >&2
    exit 1
  fi
  mkdir -p "$WORK/$folder"
  tar -xzf "$WORK/$tarball" -C "$WORK/$folder"
  rm -f "$WORK/$tarball"
  # swap in whole: an interrupted run never leaves a half-unpacked viewer behind
  rm -rf "$target.old"
  [ -e "$target" ] && mv "$target" "$target.old"
  mv "$WORK/$folder/package" "$target"
  rm -rf "$target.old"
done
echo "fetch_viewers.sh: viewers ready in $DEST"
