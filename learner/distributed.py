"""Data-parallel DPO on ``torch.distributed``: ``qrloop learn --nproc N`` or ``torchrun --nproc-per-node N``.

Rank 0 is the ordinary learner (``learner.worker``): it holds the lineage's lease, consumes the pair topic,
and publishes. Every other rank only computes: for each step rank 0 broadcasts the batch (and the DPO
settings, which SIGHUP may have changed), each rank takes its contiguous share of the pairs, and gradients
are summed with ``all_reduce`` before the same clip and AdamW update on every rank, so the replicas never
diverge and rank 0's weights are the ones published.

**Loss scaling.** ``learner.dpo``'s loss is the mean over the batch. A rank's share of ``n`` of the batch's
``B`` pairs contributes ``mean_share · n / B`` (its sum over ``B``), so the summed gradient is exactly the
gradient of the full-batch mean, whatever the shares' sizes (DDP's averaging would be right only for equal
shares). RPO's term (``rpo_alpha``) is a mean over the batch's chosen *tokens*, not its pairs, so a share
holding ``t`` of the batch's ``T`` chosen tokens contributes ``nll_share · t / T``. Clipping then sees the
same norm as a single process, and the step is the single-process step up to floating-point summation order
(``tests/test_distributed.py``: parameters equal to 1e-5, with and without RPO's term).

Backends: gloo on CPU; NCCL when CUDA is available (rank ``r`` on ``cuda:LOCAL_RANK``). Control messages
(the batch, load and stop commands) always travel on a gloo group with a long timeout: followers wait on
it while rank 0 waits for pairs, which can take hours on a quiet night.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learner import worker
from learner.dpo import Batch, DPOLearnerCore, Pair, StepStats, chosen_token_count
from policy_store import PolicyStore
from qrloop.runs import open_store
from qrloop.settings import Settings, get_settings

log = logging.getLogger("qrloop.learner.distributed")

# Followers block on the control group between steps for as long as rank 0 has no batch.
CONTROL_TIMEOUT = timedelta(days=30)
RELOADED = ("beta", "learning_rate", "max_grad_norm")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def share(pairs: Sequence[Pair], rank: int, world: int) -> list[Pair]:
    """This rank's contiguous slice of the batch; sizes differ by at most one."""
    start, stop = len(pairs) * rank // world, len(pairs) * (rank + 1) // world
    return list(pairs[start:stop])


def _device_of(core: DPOLearnerCore) -> torch.device:
    return next(core.policy.parameters()).device


def data_parallel_step(core: DPOLearnerCore, pairs: Sequence[Pair], rank: int, world: int) -> StepStats:
    """One DPO step over the whole batch ``pairs``, this rank computing its share (see the module docstring).

    Called on every rank with the same ``pairs``; returns the full batch's statistics on every rank."""
    started = time.perf_counter()
    mine = share(pairs, rank, world)
    if not mine:
        raise ValueError(f"a batch of {len(pairs)} pairs leaves rank {rank} of {world} nothing to do")
    device = _device_of(core)
    batch = {name: tensor.to(device) for name, tensor in core.tokenize(mine).items()}
    my_tokens = chosen_token_count(batch)
    alpha = core.config.rpo_alpha  # not reloadable, so every rank takes the same branch below
    core.policy.train()
    out = core.loss(batch)
    core.optimizer.zero_grad(set_to_none=True)
    my_part = out.preference * (len(mine) / len(pairs))
    if alpha:  # the batch's chosen tokens are needed before the backward only for RPO's term
        all_tokens = _summed([my_tokens], device)[0]
        my_part = my_part + alpha * out.nll * (my_tokens / max(all_tokens, 1))
    my_part.backward()
    for param in core.trainable_parameters():
        if param.grad is None:  # a parameter this share did not reach still takes part in the sum
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(core.trainable_parameters(), core.config.max_grad_norm)
    core.optimizer.step()
    core.policy.eval()
    core.steps += 1
    preference, nll, chosen_tokens, margin, chosen, rejected, correct, tokens = _summed(
        [
            float(out.preference.detach()) * len(mine),
            float(out.nll.detach()) * my_tokens,
            my_tokens,
            float(out.margin.sum()),
            float(out.chosen_rewards.sum()),
            float(out.rejected_rewards.sum()),
            float((out.margin > 0).sum()),
            float(batch["attention_mask"].sum()),
        ],
        device,
    )
    size = len(pairs)
    nll /= max(chosen_tokens, 1)
    return StepStats(
        loss=preference / size + alpha * nll,
        margin=margin / size,
        chosen_reward=chosen / size,
        rejected_reward=rejected / size,
        accuracy=correct / size,
        seconds=time.perf_counter() - started,
        tokens=round(tokens),
        grad_norm=float(grad_norm),
        nll=nll,
    )


def _summed(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over every rank (float64, so counts and sums stay exact)."""
    sums = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return [float(value) for value in sums.tolist()]


class ControlChannel:
    """Rank 0's commands to the followers: ("load", policy_version, reference_version), ("step", pairs,
    dpo settings), ("stop",)."""

    def __init__(self) -> None:
        group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        assert isinstance(group, dist.ProcessGroup), "this rank is a member of the group it created"
        self.group = group

    def send(self, *command: object) -> None:
        dist.broadcast_object_list([command], src=0, group=self.group)

    def close(self) -> None:
        """Every rank waits here after "stop": a rank that tore its group down while another was still
        receiving the stop made gloo abort that one ("terminate called without an active exception")."""
        dist.barrier(group=self.group)

    def receive(self) -> tuple[Any, ...]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return tuple(box[0])


def load_core(
    settings: Settings, store: PolicyStore, *, policy_version: int, reference_version: int
) -> DPOLearnerCore:
    """``DPOLearnerCore.from_versions`` placed on this rank's device (``cuda:LOCAL_RANK`` under NCCL)."""
    core = DPOLearnerCore.from_versions(
        settings, store, policy_version=policy_version, reference_version=reference_version
    )
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        core.policy.to(device)  # in place: the optimizer keeps referring to the same parameters
        if core.reference is not None:
            core.reference.to(device)
    return core


class DataParallelCore:
    """What ``learner.worker`` drives on rank 0: a ``DPOLearnerCore`` whose ``step`` runs on every rank."""

    def __init__(self, core: DPOLearnerCore, control: ControlChannel, world: int) -> None:
        self.core = core
        self.control = control
        self.world = world

    @property
    def base_model(self) -> str:
        return self.core.base_model

    @property
    def config(self) -> Any:
        return self.core.config

    @property
    def kind(self) -> str:
        return self.core.kind

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.core.optimizer

    def tokenize(self, pairs: Sequence[Pair]) -> Batch:
        """The learner tokenises each pair it queues alone, so that one the tokenizer refuses is dead-lettered
        by itself; the ranks tokenise the same way in the step."""
        return self.core.tokenize(pairs)

    def prepare_step(self, pairs: Sequence[Pair]) -> None:
        """Nothing ahead of the step: each rank computes the reference terms and the gradient of its own
        share in the step."""

    def forget_reference(self, pairs: Sequence[Pair]) -> None:
        """Nothing was prepared (see ``prepare_step``)."""

    def step(self, pairs: Sequence[Pair]) -> StepStats:
        settings = {name: getattr(self.core.config, name) for name in RELOADED}
        self.control.send("step", list(pairs), settings)
        return data_parallel_step(self.core, pairs, 0, self.world)

    def save(self, out_dir: Path, optimizer: bool = True) -> None:
        self.core.save(out_dir, optimizer=optimizer)


def core_factory(control: ControlChannel, world: int) -> worker.CoreFactory:
    """Rank 0's way to (re)load the lineage: the followers load the same versions, in step."""

    def make(
        settings: Settings, store: PolicyStore, *, policy_version: int, reference_version: int
    ) -> DataParallelCore:
        control.send("load", policy_version, reference_version)
        core = load_core(settings, store, policy_version=policy_version, reference_version=reference_version)
        return DataParallelCore(core, control, world)

    return make


def follow(settings: Settings, control: ControlChannel, rank: int, world: int) -> None:
    """A rank other than 0: load what rank 0 loads, step when it steps, until it says stop."""
    store = open_store(settings)
    core: DPOLearnerCore | None = None
    while True:
        command = control.receive()
        if command[0] == "stop":
            return
        if command[0] == "load":
            _, policy_version, reference_version = command
            core = load_core(
                settings, store, policy_version=policy_version, reference_version=reference_version
            )
            log.info("rank %d loaded version %d (reference %d)", rank, policy_version, reference_version)
        elif command[0] == "step":
            _, pairs, dpo = command
            assert core is not None, "rank 0 steps before it loads"
            for name, value in dpo.items():
                setattr(core.config, name, value)
            for group in core.optimizer.param_groups:
                group["lr"] = core.config.learning_rate
            data_parallel_step(core, pairs, rank, world)


def run_rank() -> None:
    """One rank, its place given by torch.distributed's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    settings = get_settings()
    dist.init_process_group(backend(), timeout=CONTROL_TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    # The host's cores are shared between the ranks (torchrun does the same with OMP_NUM_THREADS).
    torch.set_num_threads(settings.models.torch_threads or max(1, torch.get_num_threads() // world))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if settings.dpo.batch_size < world:
        raise SystemExit(
            f"dpo.batch_size {settings.dpo.batch_size} < {world} ranks: some would have no pairs"
        )
    control = ControlChannel()
    try:
        if rank == 0:
            log.info("data-parallel learner: %d ranks on %s", world, backend())
            try:
                worker.run(make_core=core_factory(control, world))
            finally:
                control.send("stop")
                control.close()
        else:
            follow(settings, control, rank, world)
            control.close()
    finally:
        dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    """Ranks die with their launcher (a SIGKILLed `qrloop learn --nproc N` leaves no orphans): abrupt exit is
    safe, nothing of a step is visible before its publish transaction commits."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _spawned(index: int, world: int, port: int, parent: int) -> None:
    from qrloop import logs

    _exit_with_parent(parent)
    if index > 0:
        # Followers stop when rank 0 tells them; a Ctrl-C reaching the whole process group must not kill
        # one in the middle of an all_reduce.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    os.environ.update(
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    config = get_settings().logging
    logs.configure(config.level, config.format)
    run_rank()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int) -> None:
    """``qrloop learn --nproc N``: N ranks on this host (under torchrun, this process is one rank)."""
    if "WORLD_SIZE" in os.environ:
        run_rank()
        return
    if nproc == 1:
        worker.run()
        return
    context = mp.start_processes(
        _spawned, args=(nproc, free_port(), os.getpid()), nprocs=nproc, join=False, start_method="spawn"
    )
    rank0 = context.processes[0]

    def forward(signum: int, _frame: FrameType | None) -> None:
        # Rank 0 finishes its step and publish, then tells the followers to stop.
        if rank0.pid is not None and rank0.is_alive():
            os.kill(rank0.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while not context.join():
        pass
