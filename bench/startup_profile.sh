#!/usr/bin/env bash
# Start-up on the device machine: `tunesmith sft` from the command to its first optimizer step on a 7B
# safetensors folder whose files are evicted from the page cache (libraries stay cached, as on any
# machine that has run Python before), against `cat` of the same cold files. The device's Python is
# set never to write bytecode (PYTHONDONTWRITEBYTECODE=1), so every start compiles every imported
# module from source; pip-installed environments have bytecode, so the starts are timed both ways.
# Then -X importtime of a start. Logs under $OUT.
set -uo pipefail
REPO=$(pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TUNESMITH_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TUNESMITH_HOME=/tmp/tshome
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/startup; mkdir -p $W; cp examples/self_cognition.json $W/
M=$W/Qwen2.5-7B-Instruct
[ -f $M/config.json ] || python3 bench/make_qwen7b.py $M --tokenizer .device/tokenizer
cd $W
evict() { sync; python3 -c "
import glob, os
for f in glob.glob('$M/*.safetensors'):
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)"; }
sft() { python3 "$@" -m tunesmith sft --model $M --dataset self_cognition.json --max_steps 1 --output_dir o 2>&1 | grep -E "first optimizer|error|fast path" ; }
echo "== first start on this machine (model files cached; no bytecode; Triton's cache as this machine has it)"; sft
echo "== reading the model files cold (evicted from the page cache): cat"
evict; /usr/bin/time -f "read (cold) %e s" cat $M/*.safetensors > /dev/null
/usr/bin/time -f "read again (cached) %e s" cat $M/*.safetensors > /dev/null
echo "== no bytecode (the device's setting), model files cold"; evict; sft
echo "== with bytecode (as pip installs): one start writes it, then model files cold twice, then cached"
unset PYTHONDONTWRITEBYTECODE; sft > /dev/null
evict; sft; evict; sft; sft
python3 -X importtime -m tunesmith sft --model $M --dataset self_cognition.json --max_steps 1 --output_dir o 2> $OUT/importtime.txt >/dev/null
python3 - <<'PY'
import os
rows = []
for line in open(os.environ.get("OUT", "/tmp/out") + "/importtime.txt"):
    if line.startswith("import time:") and "|" in line:
        parts = [p.strip() for p in line[len("import time:"):].split("|")]
        if parts[0].isdigit():
            rows.append((int(parts[1]), int(parts[0]), parts[2]))
print("top imports by cumulative time (with bytecode, files cached):")
for cum, own, name in sorted(rows, reverse=True)[:25]:
    print(f"{cum / 1e6:7.2f} s cumulative {own / 1e6:6.2f} s own  {name}")
PY
