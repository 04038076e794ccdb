#!/usr/bin/env bash
# Build the vSphere simulator the tests run against (deploy/vcsim/main.go) into
# .tools/vcsim, offline, from Debian's golang-go and golang-github-vmware-govmomi-dev.
# Does nothing when .tools/vcsim is newer than its source and than the installed
# govmomi package.
set -euo pipefail
cd "$(dirname "$0")/.."

out=.tools/vcsim
src=deploy/vcsim/main.go
govmomi=/usr/share/gocode/src/github.com/vmware/govmomi/simulator
if [ -x "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$0" ] && [ ! "$govmomi" -nt "$out" ]; then
  exit 0
fi
command -v go >/dev/null || { echo "go is missing: install Debian's golang-go" >&2; exit 1; }
[ -d "$govmomi" ] || { echo "the govmomi simulator is missing: install Debian's golang-github-vmware-govmomi-dev" >&2; exit 1; }
echo "==> building $out"
mkdir -p .tools
# The build cache lives beside the binary, so the build works without $HOME.
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE="${GOCACHE:-$PWD/.tools/go-cache}" \
  go build -o "$out.tmp" ./deploy/vcsim
mv "$out.tmp" "$out"
