#!/bin/sh
# Debian's /etc/init.d/docker runs `ulimit -n 1048576`; inside a container the nofile
# hard limit is lower (20000 here) and dash exits the script on that failure, so
# dockerd never starts. Make each ulimit best-effort: try it in a subshell first.
set -eu
f=/etc/init.d/docker
sed -i -E 's/^([[:space:]]*)ulimit (-[a-z]) ([a-z0-9]+)$/\1if (ulimit \2 \3) 2>\/dev\/null; then ulimit \2 \3; fi/' "$f"
if grep -Eq '^[[:space:]]*ulimit ' "$f"; then
    echo "patch-initd-docker: unpatched ulimit left in $f" >&2
    exit 1
fi
