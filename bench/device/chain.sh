#!/bin/bash
# Start recipes/snapfusion-train.yaml end to end in the background (issue 11's claim and issue 15's wall time), from a
# snapshot of the tree so later calls cannot change the code mid-run. Running it again continues a run that died
# (bench/snapfusion_chain.py passes --resume to snapopt apply). Poll with bench/device/collect.sh.
set -u
R=${CHAIN_DIR:-/tmp/snapchain}; mkdir -p $R/res $R/runs $R/src
[ -f $R/src/pyproject.toml ] || tar --exclude=./.whl --exclude=./.git -cf - . | (cd $R/src && tar xf -)
cd $R/src
export PYTHONPATH=$R/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
CARD=$(python -c "import torch;print(torch.cuda.get_device_name(0).replace('NVIDIA ','').split()[0].lower())")
echo "$(date -u +%H:%M:%S) chain start on $CARD" >> $R/lanes.log
setsid nohup bash -c "python bench/snapfusion_chain.py --out $R/runs/chain --claim --json $R/res/snapfusion_chain_$CARD.json \
  >> $R/chain.log 2>&1; echo \"\$(date -u +%H:%M:%S) chain done rc=\$?\" >> $R/lanes.log" > /dev/null 2>&1 &
