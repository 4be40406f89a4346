#!/bin/bash
# Run training-job specs (`python -m snapopt.train SPEC`) in the background, in the order given, on the one GPU, from a
# snapshot of the tree (as chain.sh does, under the same lock: chains and jobs never run side by side). Each job's
# folder is runs/<spec name>, its log logs/<spec name>.log; poll and fetch with bench/device/collect.sh, which packs
# result.json, the loss curves and the logs. Running it again continues unfinished jobs (--resume).
#   bash bench/device/train_jobs.sh snapopt/train/specs/recover-chain-arch-tscale-1600.yaml snapopt/train/specs/...
set -u
R=${CHAIN_DIR:-/tmp/snapchain}; mkdir -p $R/res $R/runs $R/src $R/logs
[ $# -gt 0 ] || { echo "usage: train_jobs.sh SPEC [SPEC ...]" >&2; exit 2; }
for spec in "$@"; do [ -f "$spec" ] || { echo "spec '$spec' not found" >&2; exit 2; }; done
[ -f $R/src/pyproject.toml ] || tar --exclude=./.whl --exclude=./.git -cf - . | (cd $R/src && tar xf -)
JOB=$R/jobs.$$.sh
{
  echo "cd $R/src; export PYTHONPATH=$R/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1"
  for spec in "$@"; do
    NAME=$(basename "$spec" .yaml)
    echo "echo \"\$(date -u +%H:%M:%S) chain start ($NAME)\" >> $R/lanes.log"
    echo "python -m snapopt.train $spec --out $R/runs/$NAME --resume --device cuda >> $R/logs/$NAME.log 2>&1"
    echo "echo \"\$(date -u +%H:%M:%S) chain done rc=\$? ($NAME)\" >> $R/lanes.log"
  done
} > $JOB
for spec in "$@"; do echo "$(date -u +%H:%M:%S) chain queued ($(basename "$spec" .yaml))" >> $R/lanes.log; done
Q=""; command -v flock > /dev/null && Q="flock $R/chain.lock"
setsid nohup $Q bash $JOB > /dev/null 2>&1 &
