"""Several GPUs (or CPU processes) through torch.distributed: data parallel, or FSDP2 sharding.

    NPROC_PER_NODE=2 tunesmith sft ...                 re-executes itself through torchrun (as ms-swift)
    torchrun --nproc_per_node 2 -m tunesmith sft ...   the same, launched by hand (and multi-node)

Each optimizer step's window of per_device_batch x accumulation x world_size samples is the one a
single process would train on (same seeded order on every rank); its samples are split across the
ranks, and every rank divides its summed loss by the answer tokens of the WHOLE window, so the
summed gradient is the single-process one. DDP (or FSDP2 with --fsdp) averages gradients over the
ranks, hence the factor world_size in `loss_scale`. Rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from ..errors import UserError
from ..console import log

LAUNCHER_ENV = {"NPROC_PER_NODE": "--nproc_per_node", "NNODES": "--nnodes", "NODE_RANK": "--node_rank",
                "MASTER_ADDR": "--master_addr", "MASTER_PORT": "--master_port"}


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the usual variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def requested_world() -> int:
    """Processes asked for in all: NPROC_PER_NODE x NNODES (1 where unset)."""
    counts = []
    for name in ("NPROC_PER_NODE", "NNODES"):
        value = os.environ.get(name, "").strip() or "1"
        if not value.isdigit() or int(value) < 1:
            what = "processes (GPUs) per node" if name == "NPROC_PER_NODE" else "nodes"
            raise UserError(f"{name}={value}: expected the number of {what}, e.g. 2")
        counts.append(int(value))
    return counts[0] * counts[1]


def relaunch(argv: list[str]) -> int | None:
    """NPROC_PER_NODE=N (N > 1, or NNODES > 1): run this command again under torchrun, N processes on
    this node, and return their exit code. None when nothing was asked for, or already launched."""
    if launched():
        return None
    if not os.environ.get("NPROC_PER_NODE", "").strip():
        return None
    if requested_world() == 1:
        return None
    nnodes = int(os.environ.get("NNODES", "1").strip() or 1)
    if nnodes > 1 and not os.environ.get("MASTER_ADDR"):
        raise UserError("NNODES > 1: set MASTER_ADDR (and MASTER_PORT) to the address of the machine with NODE_RANK=0")
    flags = []
    for name, flag in LAUNCHER_ENV.items():
        if os.environ.get(name, "").strip():
            flags += [flag, os.environ[name].strip()]
    if "MASTER_ADDR" not in os.environ and nnodes == 1:
        flags += ["--master_addr", "127.0.0.1"]
    if "MASTER_PORT" not in os.environ and nnodes == 1:
        flags += ["--master_port", str(_free_port())]
    return run_torchrun(flags + ["-m", "tunesmith", *argv])


def run_torchrun(torchrun_args: list[str]) -> int:
    """torch.distributed.run in this process. A failed worker has already printed its one-line error:
    return its exit code instead of torchrun's traceback of the launcher."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values() if f.exitcode]
        return next((c for c in codes if c > 0), 1)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Parallel:
    """Who this process is among the ranks; world 1 (a plain run) makes every method a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False
    module: object = None  # the DDP/FSDP-wrapped loss module, once wrap() ran

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, requested: str) -> str:
        """cuda:LOCAL_RANK on GPUs; --device, if given, must agree."""
        import torch

        if not self.active:
            from ..model.load import pick_device

            return pick_device(requested)
        if requested not in ("auto", "cuda") and requested != f"cuda:{self.local_rank}" and requested != "cpu":
            raise UserError(f"--device {requested}: under torchrun each process uses cuda:LOCAL_RANK; "
                            "choose GPUs with CUDA_VISIBLE_DEVICES instead")
        if requested == "cpu" or not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.local_rank}"

    # -- the group ---------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The first process of each machine runs the block first (it fills that machine's caches:
        tokenized data, converted models); the others after, reading them."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def broadcast(self, obj):
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_floats(self, *values: float, device: str = "cpu") -> list[float]:
        """Sum small numbers over the ranks (one all-reduce, one host sync)."""
        import torch

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t.tolist()

    # -- the work of one optimizer step ---------------------------------------------------------

    def share(self, window: list[int], lengths) -> list[int]:
        """This rank's samples of the window: longest first, each to the rank with the fewest tokens so
        far, so every rank does about the same work. The same split on every rank (deterministic)."""
        if not self.active:
            return window
        load = [0] * self.world
        mine = []
        for i in sorted(window, key=lambda i: (-lengths(i), i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            load[r] += lengths(i)
            if r == self.rank:
                mine.append(i)
        return mine

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; each rank's loss is its part of a window-wide sum."""
        return float(self.world)

    def wrap(self, model, loss_fn, device: str):
        """A callable batch -> summed loss of one micro-batch, through DDP or FSDP2 when distributed."""
        if not self.active:
            return lambda batch: loss_fn(model, batch)
        import torch

        class LossModule(torch.nn.Module):
            """One micro-batch's summed loss as a module, so DDP and FSDP see a forward they can hook."""

            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, batch, **how):  # how: loss_of's `loss` (keep.py's KL at the answer positions)
                return loss_fn(self.model, batch, **how)

        step = LossModule()
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            from ..engine.checkpointing import decoder_layers

            for layer in decoder_layers(model):
                fully_shard(layer)
            fully_shard(step)  # the root: embeddings, final norm and output layer, gathered for each step
            if device.startswith("cuda"):
                step.to(device)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Only the adapter needs synchronising; frozen base weights are loaded the same on every rank.
            frozen = [n for n, p in step.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in step.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(step, frozen)
            step = DDP(step, device_ids=None,  # the batch is already on this rank's device
                       gradient_as_bucket_view=True)
        self.module = step
        return step

    def no_sync(self, last: bool):
        """Gradients are exchanged once per optimizer step, after the window's last micro-batch."""
        if self.active and not last and not self.fsdp and self.module is not None:
            return self.module.no_sync()
        if self.active and self.fsdp and self.module is not None:
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # -- saving --------------------------------------------------------------------------------

    def adapter_state(self, model) -> dict | None:
        """With FSDP the adapter's tensors are sharded: gather the full ones (on every rank; rank 0
        writes them), only the trainable LoRA tensors, never the frozen base. None: use the model's own."""
        if not (self.active and self.fsdp):
            return None
        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[name] = full.detach().cpu()
        return out

    def optimizer_state(self, model, optimizer) -> dict:
        if not (self.active and self.fsdp):
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def setup(args) -> Parallel:
    """Join the process group when launched by torchrun: NCCL on GPUs, gloo on CPUs."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        if args.fsdp:
            log("--fsdp has no effect in a single process; launch several with NPROC_PER_NODE=N or torchrun")
        return Parallel(fsdp=False)
    import torch
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} on this node has no GPU ({torch.cuda.device_count()} visible): "
                            "use NPROC_PER_NODE <= the number of GPUs")
        torch.cuda.set_device(local)
    if args.resume_from_checkpoint and args.fsdp:
        raise UserError("--resume_from_checkpoint with --fsdp is not supported yet; resume without --fsdp")
    if not dist.is_initialized():
        kw = {"device_id": torch.device("cuda", local)} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", **kw)
    if rank != 0:  # the others' library warnings and progress bars would repeat rank 0's
        import warnings

        from transformers.utils import logging as hf_logging

        warnings.filterwarnings("ignore")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if rank == 0:
        nodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        log(f"{world} processes ({nodes} node(s)), {'NCCL on GPUs' if cuda else 'gloo on CPUs'}: "
            f"{'FSDP2 sharding of the base model' if args.fsdp else 'data parallel (DDP)'}")
    return Parallel(rank=rank, world=world, local_rank=local, fsdp=args.fsdp)
