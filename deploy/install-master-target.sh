#!/usr/bin/env bash
# Install a Linux master target as a systemd service, idempotently:
#   - the service user and group `siterecovery` (system account, no login)
#   - siterecovery from this source tree into a venv under /opt/siterecovery
#     (pip uses whatever index pip is configured with on this host)
#   - deploy/systemd/sr-master-target.service into /etc/systemd/system/
#   - deploy/config/master-target.toml as /etc/siterecovery/master-target.toml,
#     only when none is there (an existing one is never overwritten; the new
#     example is always put beside it as master-target.toml.example)
#   - with --datastore/--retention: those directories (owned by the service
#     user, 0700) and a drop-in that makes them writable in the unit's sandbox
#     (the flags of the latest run that had any replace the drop-in's list; a
#     run without them leaves it alone)
# It does not start the service: the configuration needs editing first, and it
# prints what. Run it again after an upgrade of the source tree.
#
# Usage: sudo bash deploy/install-master-target.sh [--python PYTHON]
#            [--datastore DIR]... [--retention DIR]
# The venv is always /opt/siterecovery/venv: the unit's ExecStart names it.
set -euo pipefail

SOURCE_DIR="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX=/opt/siterecovery  # fixed: sr-master-target.service's ExecStart names it
PYTHON=python3
SERVICE_USER=siterecovery
UNIT=sr-master-target.service
CONFIG_DIR=/etc/siterecovery
CONFIG="$CONFIG_DIR/master-target.toml"
UNIT_DIR=/etc/systemd/system
DATASTORES=()
RETENTION=""

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install-master-target: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --datastore) DATASTORES+=("${2:?--datastore needs a directory}"); shift 2 ;;
    --retention) RETENTION="${2:?--retention needs a directory}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

for dir in "${DATASTORES[@]}" ${RETENTION:+"$RETENTION"}; do
  case "$dir" in
    /*) ;;
    *) die "$dir is not an absolute path: systemd and the daemon need absolute paths" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "run it as root (it creates a user, writes /etc and $PREFIX)"
[ -f "$SOURCE_DIR/pyproject.toml" ] || die "$SOURCE_DIR is not a siterecovery source tree"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is older than 3.11; pass --python with a newer one"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
  || die "$PYTHON cannot make a venv; on Debian/Ubuntu: apt-get install python3-venv"

echo "==> service user $SERVICE_USER"
if ! getent group "$SERVICE_USER" >/dev/null; then
  groupadd --system "$SERVICE_USER"
fi
if ! getent passwd "$SERVICE_USER" >/dev/null; then
  useradd --system --gid "$SERVICE_USER" --home-dir /var/lib/siterecovery --no-create-home \
    --shell /usr/sbin/nologin --comment "siterecovery daemons" "$SERVICE_USER"
fi

echo "==> siterecovery into $PREFIX/venv"
install -d -m 0755 "$PREFIX"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  "$PYTHON" -m venv "$PREFIX/venv"
fi
# Not editable: the service must not depend on this source tree staying put.
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade "$SOURCE_DIR"
"$PREFIX/venv/bin/sr-master-target" --help >/dev/null

echo "==> configuration in $CONFIG_DIR"
install -d -m 0755 -o root -g root "$CONFIG_DIR"
install -m 0640 -o root -g "$SERVICE_USER" "$SOURCE_DIR/deploy/config/master-target.toml" "$CONFIG.example"
if [ -e "$CONFIG" ]; then
  echo "    kept the existing $CONFIG (new options, if any: $CONFIG.example)"
else
  install -m 0640 -o root -g "$SERVICE_USER" "$SOURCE_DIR/deploy/config/master-target.toml" "$CONFIG"
fi

echo "==> systemd unit $UNIT_DIR/$UNIT"
install -m 0644 "$SOURCE_DIR/deploy/systemd/$UNIT" "$UNIT_DIR/$UNIT"
DROPIN_DIR="$UNIT_DIR/$UNIT.d"
DROPIN="$DROPIN_DIR/paths.conf"
PATHS=("${DATASTORES[@]}" ${RETENTION:+"$RETENTION"})
if [ ${#PATHS[@]} -gt 0 ]; then
  for dir in "${PATHS[@]}"; do
    install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$dir"
  done
  install -d -m 0755 "$DROPIN_DIR"
  {
    echo "# Written by deploy/install-master-target.sh: the datastore and retention"
    echo "# directories outside the state directory, writable in the sandbox and"
    echo "# mounted before the daemon starts."
    echo "[Service]"
    echo "ReadWritePaths=${PATHS[*]}"
    echo "[Unit]"
    echo "RequiresMountsFor=${PATHS[*]}"
  } > "$DROPIN.tmp"
  chmod 0644 "$DROPIN.tmp"
  mv "$DROPIN.tmp" "$DROPIN"
  echo "    $DROPIN: ReadWritePaths=${PATHS[*]}"
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
else
  echo "    systemd is not running here: run 'systemctl daemon-reload' where it is"
fi

toml_list() {
  local first=1 dir
  printf '['
  for dir in "$@"; do
    [ $first -eq 1 ] || printf ', '
    printf '"%s"' "$dir"
    first=0
  done
  printf ']'
}

cat <<MSG

Installed. Before starting, edit $CONFIG:
  server          = "HOST:443"   the configuration server this master target enrolls with
  passphrase_file = "$CONFIG_DIR/passphrase"
                  write \`srctl passphrase show\` (run on the configuration server) into it:
                    install -m 0640 -o root -g $SERVICE_USER /dev/stdin $CONFIG_DIR/passphrase
                  (paste it, then Ctrl-D); it is read once, at enrollment
MSG
if [ ${#DATASTORES[@]} -gt 0 ]; then
  echo "  datastore_dirs  = $(toml_list "${DATASTORES[@]}")"
else
  echo "  datastore_dirs  = [\"/path/of/a/datastore\", ...]   default: the state directory's datastore/"
  echo "                  (a directory outside /var/lib/siterecovery/master-target: run this script"
  echo "                   again with --datastore DIR, which makes it writable for the service)"
fi
if [ -n "$RETENTION" ]; then
  echo "  retention_dir   = \"$RETENTION\""
else
  echo "  retention_dir   = \"/path/of/retention\"   default: the state directory's retention/"
  echo "                  (outside the state directory: run this script again with --retention DIR)"
fi
cat <<MSG
  advertise       = the name process servers use to reach this host, when its host name is not it
Every option is explained in the file. Then:
  systemctl enable --now $UNIT
  systemctl status $UNIT      # STATUS shows enrollment, registration and heartbeats
  journalctl -u $UNIT -f
MSG
