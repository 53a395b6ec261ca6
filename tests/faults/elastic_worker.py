"""A torchrun worker for ``test_elastic.py``: train, checkpoint each step, die once, resume.

Started as ``python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1
-m tests.faults.elastic_worker``. Every rank compiles the linear stack (DualPipeV, 4
micro-batches) and trains ``DPFX_STEPS`` SGD-with-momentum steps on batches drawn from the
step index. After each step it saves ``pipe.state_dict()`` and the momentum buffers (by
parameter FQN) with ``torch.distributed.checkpoint`` under ``$DPFX_OUT/ckpt/step_<k>``; rank 0
then names it in ``$DPFX_OUT/ckpt/latest``. In the first attempt
(``TORCHELASTIC_RESTART_COUNT=0``), rank ``DPFX_KILL_RANK`` SIGKILLs itself at the start of
step ``DPFX_KILL_STEP``: its peer raises ``PeerTimeoutError``, torchrun's agent stops the
group and starts it again, and the next attempt loads ``latest`` and goes on. The rank that
holds the loss appends ``step loss.hex()`` to ``$DPFX_OUT/losses.<attempt>``; each process
writes its pid to ``$DPFX_OUT/pids/<attempt>.<rank>`` so the test can check none is left.
The uninterrupted reference runs the same ``train`` on the test's pooled ranks (``uninterrupted``).
"""
from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dualpipe_fx
from dualpipe_fx import examples as ex
from tests.runtime.cases import make_case


def _state(pipe, opt, empty: bool) -> dict:
    """What a checkpoint holds: this rank's model share and its momentum buffers by FQN
    (zeros to load into when ``empty``: SGD makes its buffers at the first step)."""
    params = dict(pipe.named_parameters())
    momentum = {n: torch.zeros_like(p) if empty else opt.state[p]["momentum_buffer"] for n, p in params.items()}
    return {"model": pipe.state_dict(), "momentum": momentum}


def _resume(pipe, opt, ckpt: Path) -> int:
    """Load the checkpoint ``latest`` names, if any; the step to start from."""
    latest = ckpt / "latest"
    if not latest.exists():
        return 0
    step = int(latest.read_text())
    state = _state(pipe, opt, empty=True)
    dcp.load(state, checkpoint_id=str(ckpt / f"step_{step}"))
    pipe.load_state_dict(state["model"])
    params = dict(pipe.named_parameters())
    for name, buf in state["momentum"].items():
        opt.state[params[name]]["momentum_buffer"] = buf
    return step


def _save(pipe, opt, ckpt: Path, step: int, rank: int) -> None:
    dcp.save(_state(pipe, opt, empty=False), checkpoint_id=str(ckpt / f"step_{step}"))
    dist.barrier()
    if rank == 0:  # named only once every rank wrote its part
        tmp = ckpt / "latest.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, ckpt / "latest")


def init_process_group(attempt: int) -> None:
    """``init_process_group("gloo")`` on the agent's store, under a prefix per attempt.

    torchrun's restarted workers get the same store (same MASTER_PORT) as the attempt
    before, still holding that attempt's keys: a plain env:// init of the restarted group
    reads the dead workers' gloo addresses and fails with "Connect timeout" (torch 2.13).
    """
    world, timeout = int(os.environ["WORLD_SIZE"]), timedelta(seconds=30)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)


def main() -> None:
    out = Path(os.environ["DPFX_OUT"])
    steps, kill_step = int(os.environ["DPFX_STEPS"]), int(os.environ.get("DPFX_KILL_STEP", "-1"))
    kill_rank = int(os.environ.get("DPFX_KILL_RANK", "1"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.set_num_threads(1)
    (out / "pids").mkdir(parents=True, exist_ok=True)  # first: the test kills what is left by pid
    (out / "pids" / f"{attempt}.{os.environ['RANK']}").write_text(str(os.getpid()))
    init_process_group(attempt)
    train(out, steps, attempt, kill_step, kill_rank)
    dist.destroy_process_group()


def uninterrupted(rank: int, world: int, out: str, steps: int) -> None:
    """The reference run on a ready process group (tests/runtime/dist_harness.run_ranks): the
    same training, never killed, no torchrun."""
    train(Path(out), steps, attempt=0, kill_step=-1, kill_rank=-1)


def train(out: Path, steps: int, attempt: int, kill_step: int, kill_rank: int) -> None:
    """Resume from ``out/ckpt/latest`` if there is one, then train up to ``steps``."""
    rank = dist.get_rank()
    model, loss_fn, x, y = make_case("linear", 4)
    pipe = dualpipe_fx.compile(model, loss_fn, (x[:2],), y[:2], num_microbatches=4, timeout=20)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1, momentum=0.9)
    ckpt = out / "ckpt"
    for step in range(_resume(pipe, opt, ckpt), steps):
        if attempt == 0 and step == kill_step and rank == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        xs, ys = ex.linear_gelu_batch(8, batch=8, seed=100 + step)
        opt.zero_grad()
        loss = pipe.step(xs, target=ys)
        opt.step()
        if loss is not None:
            with open(out / f"losses.{attempt}", "a") as f:
                f.write(f"{step} {loss.item().hex()}\n")
        _save(pipe, opt, ckpt, step + 1, rank)


if __name__ == "__main__":
    main()
