"""Worker for tests/titan: several short trainings in ONE torchrun job.

``torchrun --nproc_per_node N tests/titan/ac_runs.py OUT_DIR PORTS RUN [RUN ...] -- TRAIN_ARGS``
where each RUN is ``name:--flag,value,--flag,...`` (extra torchtitan arguments for that run;
a later flag overrides TRAIN_ARGS' one, e.g. ``--job.dump_folder``) and PORTS gives each run
its own free port (``p1,p2,...``). A flag ``@copy=SRC=DST`` is no torchtitan argument: before
the run, rank 0 copies the folder SRC to DST (a seed checkpoint, or a checkpoint to resume
from) and the other ranks wait for it. A run with ``--checkpoint.create_seed_checkpoint``
saves torchtitan's seed checkpoint instead of training, as ``titan_integration.train`` does. Each run is
``titan_integration.train.main``'s sequence (parse, DualPipeFxTrainer, train, close,
destroy the process group), so one interpreter start and one import of torchtitan serve
every run. Each run's process group gets a fresh TCP store on its own port: in the store
torchrun's agent keeps for the whole job, a second process group would find the first
one's rendezvous keys and connect to ranks that are gone. Rank r writes ``OUT_DIR/rank{r}.json``: per run, the losses and grad norms
torchtitan logged, the bytes each of this rank's stages saves per micro-batch, the
recompute argument compile() got, how many torch.utils.checkpoint wrappers the model
carries (torchtitan's own AC must not be applied on the pipelining path), and a digest of
each of the rank's tensors as the trainer got them, before the first step (the initial
weights, to compare bitwise with torchtitan's non-pipelined init; with tensor parallelism,
pipelined or not, ``tp_init_digest`` holds the local shards of DTensors too); how many of its
parameters count in a lower rank's grad norm (DualPipe's mirrors), and whether an MoE
model's expert_bias moved (torchtitan's load-balancing hook ran); how many graphs
torch.compile compiled during the run (``compile.enable``: the stage graphs); and the run's wall
time in seconds (where the long tier's time goes).
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import init_logger

from passes.split_backward import saved_bytes
from titan_integration.cpu import use_cpu_when_no_gpu
from titan_integration.data import register_tiny_dataset
from titan_integration.train import DualPipeFxTrainer, _prepare, parse_job_config


# qwen3's debugmodel_moe (64 experts of 768 x 256, top 8, 8 layers: 0.3 B parameters) computes
# its grouped GEMMs in bf16, which takes about 8 s a micro-batch on this CPU: 300 s of the long
# tier for qwen3's two runs. This flavor runs the same code (grouped-GEMM experts, tokens padded
# by generate_permute_indices) with 8 experts of 256 x 256, top 2, on 4 layers.
QWEN3_MOE_CI = "debugmodel_moe_ci"


def register_qwen3_moe_ci() -> None:
    """Add :data:`QWEN3_MOE_CI` to torchtitan's qwen3 flavors (in this process)."""
    from torchtitan.protocols.train_spec import get_train_spec

    flavors = get_train_spec("qwen3").model_args
    if QWEN3_MOE_CI not in flavors:
        moe = flavors["debugmodel_moe"]
        flavors[QWEN3_MOE_CI] = dataclasses.replace(
            moe, n_layers=4, moe_inter_dim=256, moe_args=dataclasses.replace(moe.moe_args, num_experts=8, top_k=2))


def _record_metrics(trainer, record: dict) -> None:
    """Keep the (step, loss, grad norm) and the validation losses torchtitan's metrics processor is asked to log."""
    log = trainer.metrics_processor.log

    def logged(step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs):
        record["losses"][step] = float(global_avg_loss)
        record["grad_norms"][step] = float(grad_norm)
        return log(step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs)

    trainer.metrics_processor.log = logged
    log_validation = trainer.metrics_processor.log_validation

    def validated(loss, step, *args, **kwargs):
        record["validation"][step] = float(loss)
        return log_validation(loss, step, *args, **kwargs)

    trainer.metrics_processor.log_validation = validated


def digest(tensor) -> str:
    """sha1 of a CPU tensor's bytes (a DTensor's: its local shard): equal digests, bitwise equal values."""
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return hashlib.sha1(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _describe(trainer, job_config) -> dict:
    record = {"losses": {}, "grad_norms": {}, "validation": {}, "log": []}
    if job_config.parallelism.tensor_parallel_degree > 1:  # this TP rank's shards as initialised (DTensors too)
        record["tp_init_digest"] = {k: digest(v) for k, v in trainer.model_parts[0].state_dict().items()}
    if getattr(trainer, "pp_schedule", None) is None or not hasattr(trainer.pp_schedule, "pipeline"):
        return record  # torchtitan without dualpipe_fx: the reference runs
    pipeline = trainer.pp_schedule.pipeline
    model = trainer.model_parts[0]  # the Pipeline keeps no model: read the rank's model part
    recompute = trainer.pp_schedule.recompute
    return {**record,
            "saved": {str(s): saved_bytes(stage.flat_graphs) for s, stage in pipeline.stages.items()},
            "recompute": repr(recompute),
            "schedule": pipeline.program.name,
            "checkpoint_wrappers": sum(isinstance(m, CheckpointWrapper) for m in model.modules()),
            "init_digest": {k: digest(v) for k, v in model.state_dict().items() if type(v) is torch.Tensor},
            "dtensor_params": sum(isinstance(p, DTensor) for p in model.parameters()),  # TP: the plan's placements
            "replicas_marked": sum(bool(getattr(p, "_dualpipe_fx_counted_elsewhere", False))
                                   for p in model.parameters())}


class _Messages(logging.Handler):
    """Keeps the messages logged during one run."""

    def __init__(self, out: list) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


def _copy(spec: str) -> None:
    """``SRC=DST``: rank 0 copies the folder; the others wait until it is there."""
    src, dst = spec.split("=", 1)
    if os.environ["RANK"] == "0":
        shutil.copytree(src, dst + ".partial")
        os.rename(dst + ".partial", dst)  # appears whole, never half-copied
    while not os.path.isdir(dst):
        time.sleep(0.05)


def run(train_args: list[str], extra: list[str], port: str) -> dict:
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=port)
    for spec in (f for f in extra if f.startswith("@copy=")):
        _copy(spec[len("@copy="):])
    job_config = parse_job_config([*train_args, *(f for f in extra if not f.startswith("@copy="))])
    _prepare(job_config)
    trainer = DualPipeFxTrainer(job_config)
    messages = []
    handler = _Messages(messages)
    logging.getLogger().addHandler(handler)
    try:
        record = _describe(trainer, job_config)
        record["log"] = messages
        if job_config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
            return record
        _record_metrics(trainer, record)
        graphs = counters["stats"]["unique_graphs"]
        trainer.train()
        record["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs  # torch.compile's

        record["expert_bias_moved"] = any(  # the MoE load-balancing hook ran on this rank
            bool(t.abs().sum() > 0) for k, t in trainer.model_parts[0].named_buffers() if k.endswith("expert_bias"))
    finally:
        logging.getLogger().removeHandler(handler)
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return record


def main(argv: list[str]) -> None:
    split = argv.index("--")
    out_dir, ports, runs, train_args = argv[0], argv[1].split(","), argv[2:split], argv[split + 1:]
    assert len(ports) == len(runs), (ports, runs)
    init_logger()
    use_cpu_when_no_gpu()
    register_tiny_dataset()
    register_qwen3_moe_ci()
    results = {}
    for spec, port in zip(runs, ports):
        name, _, flags = spec.partition(":")
        start = time.perf_counter()
        results[name] = run(train_args, [f for f in flags.split(",") if f], port)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
