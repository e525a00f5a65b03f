#!/usr/bin/env bash
# Where the start-up time goes, on the device machine: `tunesmith sft` to its first optimizer step on a
# 7B safetensors folder, with the model files evicted from the page cache (libraries stay cached, as on
# any machine that has run Python before) against `cat` of the same cold files; then -X importtime and
# cProfile of a start with the files cached. Logs under $OUT.
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
sft() { python3 "$@" -m tunesmith sft --model $M --dataset self_cognition.json --max_steps 1 --output_dir o 2>&1 | grep -E "first optimizer|error" ; }
echo "== first start on this machine (Triton's cache empty), model files cached"
sft
echo "== reading the model files cold (evicted from the page cache): cat"
evict; /usr/bin/time -f "read (cold) %e s" cat $M/*.safetensors > /dev/null
/usr/bin/time -f "read again (cached) %e s" cat $M/*.safetensors > /dev/null
echo "== sft, model files cold, prefetch on (default)"; evict; sft
echo "== sft, model files cold, prefetch off"; evict; TUNESMITH_NO_PREFETCH=1 sft
echo "== sft, model files cached"; sft
echo "== sft, model files cold, prefetch on (again)"; evict; sft
python3 -X importtime -m tunesmith sft --model $M --dataset self_cognition.json --max_steps 1 --output_dir o 2> $OUT/importtime.txt >/dev/null
python3 - <<'PY'
import os
rows = []
for line in open(os.environ.get("OUT", "/tmp/out") + "/importtime.txt"):
    if line.startswith("import time:") and "|" in line:
        parts = [p.strip() for p in line[len("import time:"):].split("|")]
        if parts[0].isdigit():
            rows.append((int(parts[1]), int(parts[0]), parts[2]))
print("top imports by cumulative microseconds (cached files):")
for cum, own, name in sorted(rows, reverse=True)[:40]:
    print(f"{cum / 1e6:7.2f} s cumulative {own / 1e6:6.2f} s own  {name}")
PY
python3 -m cProfile -o /tmp/startup.prof -m tunesmith sft --model $M --dataset self_cognition.json --max_steps 1 --output_dir o 2>&1 | grep "first optimizer"
python3 -c "
import pstats; s = pstats.Stats('/tmp/startup.prof'); s.sort_stats('cumulative').print_stats(45)" | tail -60
