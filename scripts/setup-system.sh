#!/usr/bin/env bash
# Installs the Debian packages the viewer tests need, only those missing (idempotent, non-interactive, quiet):
#   orthanc, orthanc-dicomweb  a DICOMweb server; the tests start their own instance (own config, port, storage)
#   chromium                   headless browser for the OHIF test, driven over the DevTools protocol
#   fonts-dejavu-core          a font, so that screenshots show text
# It configures and starts nothing: Debian would start the Orthanc service on install (ports 8042 and 4242, no
# authentication), so a policy-rc.d that forbids service starts is in place while it installs.
# Without root it uses sudo when available, else says what to install and carries on (those tests then skip).
set -euo pipefail

PACKAGES=(orthanc orthanc-dicomweb chromium fonts-dejavu-core)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    echo "setup-system: no apt-get here; install ${missing[*]} by other means (the viewer tests skip without them)" >&2
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "setup-system: not root; install ${missing[*]} (apt-get) for the viewer tests (they skip without them)" >&2
        exit 0
    fi
fi

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
policy=/usr/sbin/policy-rc.d
made_policy=0
cleanup() {
    rm -f "$log"
    if [ "$made_policy" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# no service starts while the test packages install\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    made_policy=1
fi
if ! { "${SUDO[@]}" apt-get update -qq &&
       "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    # Carry on: the tests that need these packages skip, saying which is missing; everything else still runs.
    echo "setup-system: WARNING: installing ${missing[*]} failed; the viewer tests will skip" >&2
    exit 0
fi
echo "system packages installed in $(( $(date +%s) - start )) s: ${missing[*]}"
