#!/usr/bin/env bash
# Orthanc and its DICOMweb plugin, for the PACS round-trip tests (tests/test_pacs.py run their own Orthanc on free
# loopback ports). Installs them with apt-get when they are missing and this runs as root; otherwise says how, and
# the tests skip (with CI=true they fail instead).
set -euo pipefail
if command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "Orthanc is not installed: the PACS tests will skip (install it: sudo apt-get install orthanc orthanc-dicomweb)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb
# the package starts a system Orthanc on its default ports where a service manager runs; the tests start their own
if command -v service >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
