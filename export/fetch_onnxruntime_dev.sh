#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (not in the pip wheel) from Debian trixie's
# libonnxruntime-dev into DEST, with a private apt state (the system's apt is untouched).
#   export/fetch_onnxruntime_dev.sh DEST   ->  DEST/usr/include/onnxruntime/onnxruntime_cxx_api.h
set -euo pipefail
dest=${1:?usage: fetch_onnxruntime_dev.sh DEST}
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$dest"
echo "deb http://deb.debian.org/debian trixie main" > "$state/sources.list"
opts=(-o "Dir::State=$state" -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
      -o "Dir::Etc::SourceList=$state/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -qq)
apt-get "${opts[@]}" update
(cd "$state" && apt-get "${opts[@]}" download libonnxruntime-dev)
dpkg -x "$state"/libonnxruntime-dev_*.deb "$dest"
test -f "$dest/usr/include/onnxruntime/onnxruntime_cxx_api.h"
echo "$dest/usr/include/onnxruntime"
