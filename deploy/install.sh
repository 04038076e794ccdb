#!/usr/bin/env bash
# Install everything siterecovery needs on a Debian-like machine, idempotently:
#   - system packages: the real peers the tests run against (PostgreSQL)
#   - a Python virtual environment in .venv with siterecovery and its dev tools
# Run it again at any time; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the project uses, and why:
#   postgresql  the scale-out store; the store contract tests start a throwaway cluster
#   fio, qemu-utils (qemu-io, qemu-img), libnbd-bin (nbdcopy, nbdinfo)
#               real block clients that write through the source agent's NBD export
#   golang-go, golang-github-vmware-govmomi-dev
#               the vSphere simulator (vcsim) the vSphere provider is tested against,
#               built offline into .tools/ by deploy/build-vcsim.sh
#   faketime    libfaketime: the fault tests step one daemon's wall clock
#   rsync       the peer the replication benchmarks (bench/) are measured against
#   iperf3      the loopback TCP ceiling bench/transport_ceiling.py prints beside them
APT_PACKAGES=(postgresql fio qemu-utils libnbd-bin golang-go golang-github-vmware-govmomi-dev faketime rsync iperf3)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

bash deploy/build-vcsim.sh

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "siterecovery needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> installing siterecovery into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# Azurite, the Azure Storage emulator the page-blob tests run against, from npm into
# deploy/azurite/node_modules (git-ignored), at the version package.json pins and the
# lock file fixes (the lock names versions and integrity hashes, not registry addresses).
AZURITE_DIR=deploy/azurite
azurite_wanted=$(sed -n 's/.*"azurite": *"\([^"]*\)".*/\1/p' "$AZURITE_DIR/package.json")
azurite_have=""
if [ -f "$AZURITE_DIR/node_modules/azurite/package.json" ]; then
  azurite_have=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$AZURITE_DIR/node_modules/azurite/package.json" | head -1)
fi
if [ "$azurite_have" != "$azurite_wanted" ] || [ ! -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ]; then
  if ! command -v npm >/dev/null; then
    echo "==> installing Debian packages: nodejs npm (for Azurite)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
  fi
  echo "==> installing Azurite $azurite_wanted (npm, into $AZURITE_DIR/node_modules)"
  (cd "$AZURITE_DIR" && npm ci --no-fund --no-audit --loglevel=error)
fi
echo "==> done: try  .venv/bin/srctl lab up"
