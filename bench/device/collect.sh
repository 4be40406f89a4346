#!/bin/bash
# Wait up to $1 seconds (default 540) for the queued chains (every "chain start" in lanes.log has its "chain done"),
# print their progress, and pack their results into $OUT: result JSONs with claims and grids (res/), logs, and each
# run folder's report, grids and loss curves as run_<name>.tgz (no weights or exports). Call again within 30 s of
# the last call to keep the machine.
R=${CHAIN_DIR:-/tmp/snapchain}; end=$((SECONDS + ${1:-540}))
count() { cat $R/lanes.log 2>/dev/null | grep -c "$1"; }  # 0 without a lanes.log (nothing queued on this machine)
pending() { [ "$(count 'chain queued')" -gt "$(count 'chain done')" ]; }
while [ $SECONDS -lt $end ] && pending; do sleep 5; done
cat $R/lanes.log 2>/dev/null
for log in $R/logs/*.log; do  # each chain's last stage and progress line
  [ -f "$log" ] || continue
  echo "-- $(basename $log .log): $(grep -a "^\[snapopt\]" $log | tail -1)"
  tail -c 300 $log | tr '\r' '\n' | grep -v '^$' | tail -1
done
P=$R/pack; rm -rf $P; mkdir -p $P
cp -r $R/res $P/ 2>/dev/null; cp -r $R/logs $R/lanes.log $P/ 2>/dev/null
for run in $R/runs/* $R/runs/.*.work; do
  [ -d "$run" ] || continue
  name=$(basename "$run"); name=${name#.}; name=${name%.work}
  (cd "$run" && find . \( -name checkpoints -o -name model -o -name exports -o -name .resume \) -prune -o \
    -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.csv' \) -print | tar -czf $P/run_$name.tgz -T -)
done
tar -czf $OUT/chain_results.tgz -C $P . && ls -la $OUT
