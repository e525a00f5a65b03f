"""One kernel-build worker (train/prebuild.py) run in the open on the device, on the guide's flags and the 7B
folder, into its own cold Triton cache: shows its errors (the real workers are silent) and how long it takes.
    python3 bench/prebuild_probe.py MODEL_DIR"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tunesmith.args import args_dict
from tunesmith.cli import parse_args

model = sys.argv[1]
args = parse_args("sft", ["--model", model, "--dataset", "x.json", "--lora_rank", "8", "--lora_alpha", "32",
                          "--torch_dtype", "bfloat16", "--target_modules", "all-linear"])
job = {"model": model, "args": args_dict(args), "workers": 1, "marker": "/tmp/probe-marker", "parent": os.getpid()}
env = {**os.environ, "TRITON_CACHE_DIR": "/tmp/triton-probe"}
t = time.time()
proc = subprocess.run([sys.executable, "-m", "tunesmith.train.prebuild", "0"], input=json.dumps(job), text=True,
                      capture_output=True, env=env)
print(f"probe worker: exit {proc.returncode} in {time.time() - t:.1f} s; kernels built:",
      sorted({f.rsplit('.', 1)[0] for _, _, fs in os.walk("/tmp/triton-probe") for f in fs if f.endswith(".cubin")}))
print(proc.stderr[-3000:])
