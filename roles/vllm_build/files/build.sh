# vllm_build: FlagScale's own unpatch, then one wheel of the patched tree (read by bash -s).
# Args: <FlagScale checkout> <wheel dir of this key> <log> <VLLM_TARGET_DEVICE> <version> <MAX_JOBS> -- <unpatch.py args...>
# Stdout, last lines: "present" (the key's wheel exists), or timings then "built".
# Exit 3: unpatch failed (FLAGOPS_PATCH_FAIL line names patch, file, line, hunk); 4: build failed.
# Either way the log is kept, its tail is printed and older wheels are left as they were.
set -uo pipefail
src=$1 dest=$2 log=$3 target=$4 version=$5 jobs=$6
shift 7
if [ "$jobs" = 0 ]; then jobs=$(nproc); fi
if ls "$dest"/vllm-*.whl >/dev/null 2>&1; then echo present; exit 0; fi
root=$(dirname "$dest")
mkdir -p "$root"
rm -rf "$dest".tmp.*
tmp="$dest.tmp.$$"
mkdir -p "$tmp"
now() { date +%s.%N; }
t0=$(now)
cd "$src" || exit 2
echo "== flagops: python3 tools/patch/unpatch.py $* ($(date -u +%FT%TZ))" >"$log"
if ! python3 tools/patch/unpatch.py "$@" >>"$log" 2>&1; then
  rm -rf "$tmp"
  patch=$(sed -n "s/.*Failed to apply patch '\([^']*\)'.*/\1/p" "$log" | head -n1)
  where=$(sed -n 's/.*error: patch failed: \([^ :]*\):\([0-9]*\).*/\1 \2/p' "$log" | head -n1)
  missing=$(sed -n "s/.*error: \([^ :]*\): \(No such file or directory\|does not exist in index\|already exists in working directory\).*/\1: \2/p" "$log" | head -n1)
  if [ -n "$patch" ]; then
    file=${where% *} line=${where#* } hunk=
    if [ -n "$where" ]; then hunk=$(grep -m1 -E "^@@ -$line(,[0-9]+)? " "$patch" || true); fi
    echo "FLAGOPS_PATCH_FAIL patch=${patch#"$src"/} file=${file:-${missing%%:*}} line=${line:-?} hunk=${hunk:-${missing:-?}}"
  fi
  echo "FLAGOPS_LOG=$log"
  tail -n 30 "$log"
  exit 3
fi
t1=$(now)
cd third_party/vllm || exit 2
echo "== flagops: VLLM_TARGET_DEVICE=$target SETUPTOOLS_SCM_PRETEND_VERSION=$version MAX_JOBS=$jobs pip wheel . --no-build-isolation --no-deps" >>"$log"
if ! VLLM_TARGET_DEVICE=$target SETUPTOOLS_SCM_PRETEND_VERSION=$version MAX_JOBS=$jobs \
    pip wheel . --no-build-isolation --no-deps --wheel-dir "$tmp" >>"$log" 2>&1; then
  rm -rf "$tmp"
  echo "FLAGOPS_LOG=$log"
  tail -n 40 "$log"
  exit 4
fi
t2=$(now)
# the pristine tree (the gitlink's commit), for the install proof on every node
git ls-tree -r HEAD vllm/ >"$tmp/pristine.ls-tree" || { rm -rf "$tmp"; echo "FLAGOPS_LOG=$log"; echo "git ls-tree of third_party/vllm failed"; exit 4; }
count=$(ls "$tmp"/vllm-*.whl 2>/dev/null | wc -l)
if [ "$count" != 1 ]; then rm -rf "$tmp"; echo "FLAGOPS_LOG=$log"; echo "pip wheel left $count vllm wheels"; exit 4; fi
mv "$tmp" "$dest"
# one wheel on shared storage: older keys go once this one is in place
for old in "$root"/vllm-*; do
  case "$old" in "$dest" | "$log") ;; *) rm -rf "$old" ;; esac
done
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "unpatch_s=%.1f build_s=%.1f\n", b - a, c - b }'
echo built
