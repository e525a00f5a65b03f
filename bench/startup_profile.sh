#!/usr/bin/env bash
# Start-up on the device machine: `tunesmith sft` from the command to its first optimizer step on a 7B
# safetensors folder whose files are evicted from the page cache (libraries stay cached, as on any
# machine that has run Python before), against `cat` of the same cold files. Python writes bytecode, as
# pip-installed environments have it (the device's Python is set not to: PYTHONDONTWRITEBYTECODE=1; session
# 3 measured that case, 23.7 s). Starts with the weights staged onto the GPU during start-up (the default,
# preload.stage) and without (TUNESMITH_NO_STAGE=1), alternated; then -X importtime (STARTUP_IMPORTTIME=0: not)
# and a check that staged weights equal the files'. STARTUP_READERS=1: also time preload.prefetch alone with
# 1/2/4/8 reader threads (session 4: 8.9-10.1 s, no better than cat). Logs under $OUT.
# (cProfile of a start was tried in session 4: with transformers' loader threads its numbers do not add up.)
set -uo pipefail
REPO=$(pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TUNESMITH_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TUNESMITH_HOME=/tmp/tshome
unset PYTHONDONTWRITEBYTECODE
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/startup; mkdir -p $W; cp examples/self_cognition.json $W/
M=$W/Qwen2.5-7B-Instruct
[ -f $M/config.json ] || python3 bench/make_qwen7b.py $M --tokenizer .device/tokenizer
cd $W
evict() { sync; python3 -c "
import glob, os
for f in glob.glob('$M/*.safetensors'):
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)"; }
SFT="-m tunesmith sft --model $M --dataset self_cognition.json --max_steps 1 --output_dir o"
sft() { python3 $SFT 2>&1 | grep -E "first optimizer|error|fast path|loaded" ; }
echo "== first start on this machine (writes bytecode; Triton's cache as this machine has it)"; sft
echo "== reading the model files cold (evicted from the page cache): cat"
evict; /usr/bin/time -f "read (cold) %e s" cat $M/*.safetensors > /dev/null
/usr/bin/time -f "read again (cached) %e s" cat $M/*.safetensors > /dev/null
[ "${STARTUP_READERS:-0}" = 1 ] && for n in 1 2 4 8; do  # the prefetch alone, with n reader threads
  evict; python3 -c "
import threading, time
from tunesmith.model import preload
t = time.time(); preload.prefetch('$M', readers=$n)
[th.join() for th in threading.enumerate() if th.name.startswith('tunesmith-prefetch')]
print(f'read (cold) by preload.prefetch with $n readers: {time.time() - t:.2f} s')"
done
for i in 1 2 3; do
  echo "== staged (default), model files cold"; evict; sft
  echo "== not staged (TUNESMITH_NO_STAGE=1), model files cold"; evict; TUNESMITH_NO_STAGE=1 sft
done
echo "== staged, model files cached"; sft
[ "${STARTUP_IMPORTTIME:-1}" = 1 ] && python3 -X importtime $SFT 2> $OUT/importtime.txt >/dev/null && python3 - <<'PY'
import os
rows = []
for line in open(os.environ.get("OUT", "/tmp/out") + "/importtime.txt"):
    if line.startswith("import time:") and "|" in line:
        parts = [p.strip() for p in line[len("import time:"):].split("|")]
        if parts[0].isdigit():
            rows.append((int(parts[1]), int(parts[0]), parts[2]))
print("top imports by cumulative time (with bytecode, files cached):")
for cum, own, name in sorted(rows, reverse=True)[:15]:
    print(f"{cum / 1e6:7.2f} s cumulative {own / 1e6:6.2f} s own  {name}")
PY
python3 - <<PY
import time, torch
from pathlib import Path
from safetensors.torch import load_file
from tunesmith.model import preload
files = sorted(Path("$M").glob("*.safetensors"))
t = time.time(); staged = preload.read_into(files, "cuda", torch.bfloat16); torch.cuda.synchronize()
print(f"staged {len(staged)} tensors (files cached) in {time.time() - t:.1f} s")
same = all(torch.equal(staged[k], v) for f in files for k, v in load_file(f, device="cuda").items())
print("staged weights equal the files':", same)
PY
