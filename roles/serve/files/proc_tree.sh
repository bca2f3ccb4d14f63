# Usage: bash -c "$(cat proc_tree.sh)" proc-tree ACTION PID [STARTTIME]
#   ACTION=alive: exit 0 if PID runs and (when given) has the recorded start time
#   ACTION=stop : TERM the whole tree under PID, wait, KILL what is left
# The tree is collected from /proc parent links before any signal is sent,
# so children re-parented by the kill are still stopped.  No name patterns.
set -u
action=$1 pid=$2 want_start=${3:-}
starttime() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }
if ! kill -0 "$pid" 2>/dev/null; then echo "not-running"; exit 3; fi
if [ -n "$want_start" ] && [ "$(starttime "$pid")" != "$want_start" ]; then
  echo "pid $pid was reused by another process; not touching it"; exit 4
fi
[ "$action" = alive ] && { echo "running"; exit 0; }
tree() { local p=$1 c; for c in $(ps -o pid= --ppid "$p"); do tree "$c"; done; echo "$p"; }
pids=$(tree "$pid")
kill -TERM $pids 2>/dev/null
for _ in $(seq 1 75); do
  alive=""
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && { echo "stopped:$(echo $pids | wc -w)"; exit 0; }
  sleep 0.2
done
kill -KILL $alive 2>/dev/null
echo "killed:$(echo $alive | wc -w)"
