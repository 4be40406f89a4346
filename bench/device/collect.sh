#!/bin/bash
# Wait up to $1 seconds (default 540) for the chain, print its progress, and pack its results into $OUT (JSON, report,
# grids, loss curves; no weights or exports). Call again within 30 s of the last call to keep the machine.
R=${CHAIN_DIR:-/tmp/snapchain}; end=$((SECONDS + ${1:-540}))
while [ $SECONDS -lt $end ]; do tail -1 $R/lanes.log 2>/dev/null | grep -q "chain done" && break; sleep 5; done
cat $R/lanes.log 2>/dev/null
grep -a "^\[snapopt\]" $R/chain.log 2>/dev/null | tail -3
tail -c 300 $R/chain.log 2>/dev/null | tr '\r' '\n' | tail -2
P=$R/pack; rm -rf $P; mkdir -p $P/run
cp -r $R/res $P/ 2>/dev/null; cp $R/chain.log $R/lanes.log $P/ 2>/dev/null
run=$R/runs/chain; [ -d $run ] || run=$(ls -d $R/runs/.chain*.work 2>/dev/null | head -1)
[ -n "$run" ] && [ -d "$run" ] && (cd $run && find . \( -name checkpoints -o -name model -o -name exports -o -name .resume \) -prune -o \
  -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.csv' \) -print | tar -czf $P/run.tgz -T -)
tar -czf $OUT/chain_results.tgz -C $P . && ls -la $OUT
