"""One variant on several processes (GPUs): torchrun / accelerate launch, data-parallel through the Trainer.

    torchrun --nproc_per_node 4 -m lora_kit train -f params/C2.yaml
    accelerate launch --num_processes 4 -m lora_kit train -f params/C2.yaml
    python -m lora_kit train -f params/C2.yaml --set nproc=4     # starts torchrun itself (so does train.ipynb)

The Hugging Face Trainer shards the batches and averages the gradients (DDP, or the DeepSpeed / FSDP
config given as `deepspeed` / `fsdp`, or an accelerate config). lora_kit adds one rule: rank 0 alone owns
the run folder and runs the guardrail evaluation; the other ranks wait for it and then follow its
decision (stop, save) together. They wait on a CPU (gloo) group whose timeout is an evaluation's length,
not at the next gradient all-reduce, whose timeout (30 minutes, NCCL's watchdog) an evaluation of a real
model could outlast.

When FSDP or ZeRO-3 shard the weights, no rank holds the whole model, so the evaluation is sharded
instead: every rank evaluates its share of the samples (its forward passes gather the weights layer by
layer, as in training), the answers and loss sums are gathered on the gloo group, and rank 0 alone
computes the metrics, writes them and decides. Each sample is still evaluated once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml

from .errors import ConfigError, LoraKitError

# How long the other ranks wait for rank 0 (an evaluation, claiming the run folder, the summary).
RANK0_WAIT = timedelta(hours=6)


class RankZeroFailed(LoraKitError):
    """Raised on the other ranks when what rank 0 did for all of them failed."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: rank, world size, and the group the ranks wait on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None  # the gloo group of on_rank0 (None in a single process)
    sharded: bool = False  # FSDP / ZeRO-3: the weights are sharded, so evaluations run on every rank

    @property
    def shares_evaluation(self) -> bool:
        """Whether every rank takes part in each evaluation (its share of the samples)."""
        return self.sharded and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_rank0(self, fn, *args, **kwargs):
        """Run fn on rank 0 only; every rank returns its result (or raises its error).

        The other ranks block here until rank 0 is done, so rank 0 may take as long as RANK0_WAIT.
        """
        if self.world_size == 1:
            return fn(*args, **kwargs)
        box = [None]
        if self.is_main:
            try:
                box = [("ok", fn(*args, **kwargs))]
            except BaseException as e:
                torch.distributed.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0,
                                                        group=self.group)
                raise
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        kind, value = box[0]
        if kind == "error":
            raise RankZeroFailed(f"rank 0 failed, so rank {self.rank} stops too: {value}")
        return value

    def share(self, items: list, pad) -> list:
        """This rank's share of items (every world_size-th), padded with `pad` to the same length on every
        rank, so that all ranks make the same number of forward passes (a sharded forward is collective)."""
        mine = items[self.rank::self.world_size]
        return mine + [pad] * (-(-len(items) // self.world_size) - len(mine))

    def gather(self, results: list, n: int) -> list:
        """The n results of share()'s items, in the items' order, on every rank (padding dropped)."""
        per_rank = [None] * self.world_size
        torch.distributed.all_gather_object(per_rank, results, group=self.group)
        out = [None] * n
        for rank, part in enumerate(per_rank):
            for j, result in enumerate(part[:len(range(rank, n, self.world_size))]):
                out[rank + j * self.world_size] = result
        return out

    def sum(self, *values: float) -> tuple[float, ...]:
        """The sum over the ranks of each value (float64, on the gloo group)."""
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, group=self.group)
        return tuple(t.tolist())

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def record(self) -> dict:
        """What params.json records about the processes of the run."""
        return {"world_size": self.world_size,
                "backend": torch.distributed.get_backend() if self.world_size > 1 else None,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def launched_world_size() -> int:
    """The processes a launcher (torchrun, accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(nproc: int) -> Ranks:
    """This process's Ranks; under a launcher, joins the process group the Trainer then reuses.

    `nproc` (the parameter) must be 1 (the launcher decides) or equal to the launcher's world size.
    """
    world_size = launched_world_size()
    if nproc not in (1, world_size):
        raise ConfigError(f"nproc = {nproc} but the launcher started {world_size} process(es): set nproc to "
                          f"{world_size} (or 1: the launcher decides), or launch {nproc} processes.")
    if world_size == 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    group = torch.distributed.new_group(backend="gloo", timeout=RANK0_WAIT)
    return Ranks(torch.distributed.get_rank(), world_size, local_rank, group)


def torchrun_command(params_file: Path, nproc: int) -> list[str]:
    """`python -m lora_kit train -f params_file` under torchrun, nproc processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "lora_kit", "train", "-f", str(params_file)]


def check_nproc(nproc: int) -> None:
    """Refuse more processes than GPUs (on a CPU-only machine any number runs, on gloo)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc < 1 or (gpus and nproc > gpus):
        raise ConfigError(f"nproc = {nproc}: expected 1 to {gpus or 'any number of'} processes "
                          f"({gpus} GPU(s) visible). Fix: set nproc to at most {max(gpus, 1)}.")


def launch(cfg, *, log=print) -> Path:
    """Train cfg's variant in cfg.nproc processes under torchrun; returns its run folder.

    The resolved parameters go to the processes as one params file, so they train exactly `cfg`.
    """
    from .paths import runs_dir

    check_nproc(cfg.nproc)
    with tempfile.TemporaryDirectory(prefix="lora_kit_launch_") as tmp:
        params = Path(tmp) / f"{cfg.variant_name}.yaml"
        params.write_text(yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
        cmd = torchrun_command(params, cfg.nproc)
        log(f"{cfg.variant_name}: launching {cfg.nproc} processes: {' '.join(cmd)}")
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # live, so that a notebook shows the progress
                log(line.rstrip("\n"))
    if proc.returncode != 0:
        raise LoraKitError(f"{cfg.variant_name}: torchrun exited with {proc.returncode} (its output is above); "
                           f"the run folder {runs_dir(cfg.output_dir) / cfg.variant_name} records the failure.")
    return runs_dir(cfg.output_dir) / cfg.variant_name
