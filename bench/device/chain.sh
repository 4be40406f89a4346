#!/bin/bash
# Start recipes/snapfusion-train.yaml end to end in the background (issue 11's claim and issue 15's wall time), from a
# snapshot of the tree so later calls cannot change the code mid-run. Running it again continues a run that died
# (bench/snapfusion_chain.py passes --resume to snapopt apply). Poll with bench/device/collect.sh.
# Variants (ablations): CHAIN_NAME names the result and the run folder (default snapfusion_chain, run folder runs/chain);
# CHAIN_SETS holds space-separated `snapopt apply --set` overrides, no spaces inside one
# (CHAIN_SETS="recover.loss.timestep_scaling=false step_distill.loss.cfg_range=[2,14]"). Chains started while one runs
# wait for it (flock), so several variants started in one call run back to back on the one GPU: side by side they are
# slower, not faster (bench/device/README.md). Each chain logs to logs/<name>.log.
set -u
R=${CHAIN_DIR:-/tmp/snapchain}; mkdir -p $R/res $R/runs $R/src
NAME=${CHAIN_NAME:-snapfusion_chain}; RUN=chain; [ "$NAME" = snapfusion_chain ] || RUN=$NAME
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "CHAIN_NAME: '$NAME' is not a plain name (letters, digits, . _ -)" >&2; exit 2; }
SETS=""; for s in ${CHAIN_SETS:-}; do SETS="$SETS --set $(printf %q "$s")"; done
LABEL=""; [ "$NAME" = snapfusion_chain ] && [ -z "$SETS" ] || LABEL=" ($NAME${SETS:+,$SETS})"
[ -f $R/src/pyproject.toml ] || tar --exclude=./.whl --exclude=./.git -cf - . | (cd $R/src && tar xf -)
cd $R/src
export PYTHONPATH=$R/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
CARD=$(python -c "import torch;print(torch.cuda.get_device_name(0).replace('NVIDIA ','').split()[0].lower())")
mkdir -p $R/logs
JOB=$R/$NAME.job.sh  # the variant's commands, run under the queue's lock
cat > $JOB <<JOBEOF
echo "\$(date -u +%H:%M:%S) chain start on $CARD$LABEL" >> $R/lanes.log
python bench/snapfusion_chain.py --out $R/runs/$RUN --claim --name $NAME --json $R/res/${NAME}_$CARD.json$SETS >> $R/logs/$NAME.log 2>&1
echo "\$(date -u +%H:%M:%S) chain done rc=\$?$LABEL" >> $R/lanes.log
JOBEOF
Q=""; command -v flock > /dev/null && Q="flock $R/chain.lock"
echo "$(date -u +%H:%M:%S) chain queued$LABEL" >> $R/lanes.log  # collect.sh waits until every queued chain is done
setsid nohup $Q bash $JOB > /dev/null 2>&1 &
