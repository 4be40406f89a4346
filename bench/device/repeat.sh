#!/bin/bash
# Run recipes/snapfusion-train.yaml (or $RECIPE) twice in the background and compare the two models' weights tensor by tensor
# (bench/repeat_check.py; does `deterministic: true` give the same model twice on this GPU?), from a snapshot of the
# tree, under the chains' lock. Extra arguments go to repeat_check.py (e.g. --set deterministic=false). Result:
# res/repeat_check_<card>.json, log: logs/repeat_check.log; poll and fetch with bench/device/collect.sh.
#   bash bench/device/repeat.sh --set export.coreml=false --set export.onnx=false
set -u
R=${CHAIN_DIR:-/tmp/snapchain}; mkdir -p $R/res $R/src $R/logs
[ -f $R/src/pyproject.toml ] || tar --exclude=./.whl --exclude=./.git -cf - . | (cd $R/src && tar xf -)
CARD=$(python -c "import torch;print(torch.cuda.get_device_name(0).replace('NVIDIA ','').split()[0].lower() if torch.cuda.is_available() else 'cpu')")
RECIPE=${RECIPE:-recipes/snapfusion-train.yaml}
ARGS=""; for a in "$@"; do ARGS="$ARGS $(printf %q "$a")"; done
JOB=$R/repeat.$$.sh
cat > $JOB <<JOBEOF
cd $R/src; export PYTHONPATH=$R/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
echo "\$(date -u +%H:%M:%S) chain start (repeat_check)" >> $R/lanes.log
python bench/repeat_check.py $RECIPE$ARGS --json $R/res/repeat_check_$CARD.json >> $R/logs/repeat_check.log 2>&1
echo "\$(date -u +%H:%M:%S) chain done rc=\$? (repeat_check)" >> $R/lanes.log
JOBEOF
echo "$(date -u +%H:%M:%S) chain queued (repeat_check)" >> $R/lanes.log
Q=""; command -v flock > /dev/null && Q="flock $R/chain.lock"
setsid nohup $Q bash $JOB > /dev/null 2>&1 &
