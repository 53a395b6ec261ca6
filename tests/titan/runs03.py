"""Worker for tests/titan/test_titan03.py: several torchtitan 0.3 trainings in ONE torchrun job.

``torchrun --nproc_per_node N tests/titan/runs03.py OUT_DIR PORTS RUN [RUN ...] -- ARGS``
where each RUN is ``name:--flag,value,...`` (0.3 command-line flags for that run, after the
shared ``ARGS``) and PORTS gives each run its own free port. A run whose flags hold
``--resume-from,DIR`` starts with ``DIR`` (a saved ``step-N`` folder) copied into its
checkpoint folder, so 0.3's checkpointer resumes from it. Each run is 0.3's
``torchtitan.train.main`` sequence (parse, build the trainer, train, close, destroy the
process group) in a dump folder of its own (``OUT_DIR/name``); its process group gets a
fresh TCP store on its own port (as in tests/titan/ac_runs.py). Rank r writes
``OUT_DIR/rank{r}.json``: per run, the losses and grad norms 0.3 logged, and for a run with
expert parallelism under dualpipe_fx what the rank holds and traced (:func:`_expert_layout`).
"""
import json
import os
import shutil
import sys

import torch.distributed as dist

RESUME = "--resume-from"


def _record_metrics(trainer, record: dict) -> None:
    """Keep the (step, loss, grad norm) 0.3's metrics processor is asked to log."""
    log = trainer.metrics_processor.log

    def logged(step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs):
        record["losses"][step] = float(global_avg_loss)
        record["grad_norms"][step] = float(grad_norm)
        return log(step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs)

    trainer.metrics_processor.log = logged


def _expert_layout(trainer) -> dict:
    """This rank's routed-expert parameters (FQN -> local shape) and how many ``all_to_all``
    nodes its stages' forward and input-backward graphs hold (dualpipe_fx's pipeline only)."""
    from torch.distributed.tensor import DTensor

    # 0.3's own run names its AC wrapper in the FQNs (named_parameters of the wrapped model)
    experts = {fqn.replace("_checkpoint_wrapped_module.", ""):
               list((p.to_local() if isinstance(p, DTensor) else p).shape)
               for part in trainer.model_parts for fqn, p in part.named_parameters()
               if ".inner_experts." in fqn}
    schedule = getattr(getattr(trainer, "pp_schedule", None), "schedule", None)  # none without PP
    pipeline = getattr(schedule, "pipeline", None)
    if pipeline is None:
        return {"experts": experts}
    counts = {"forward": 0, "backward_input": 0}
    for stage in pipeline.stages.values():
        for kind in counts:
            gm = getattr(stage.flat_graphs, kind).gm
            counts[kind] += sum("all_to_all" in str(node.target) for node in gm.graph.nodes)
    return {"experts": experts, "all_to_all": counts}


def run(args: list[str], dump: str, port: str) -> dict:
    from torchtitan.config import ConfigManager

    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=port)
    if RESUME in args:
        i = args.index(RESUME)
        source, args = args[i + 1], args[:i] + args[i + 2:]
        if os.environ["RANK"] == "0":  # before the rendezvous: done before any rank loads
            shutil.copytree(source, os.path.join(dump, "checkpoint", os.path.basename(source)))
    config = ConfigManager().parse_args([*args, "--dump_folder", dump])
    trainer = config.build()
    record = {"losses": {}, "grad_norms": {}}
    try:
        if config.checkpoint.create_seed_checkpoint:  # as 0.3's torchtitan.train.main does
            trainer.checkpointer.save(curr_step=0, last_step=True)
            return record
        _record_metrics(trainer, record)
        trainer.train()
        if config.parallelism.expert_parallel_degree > 1:
            record.update(_expert_layout(trainer))
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return record


def main(argv: list[str]) -> None:
    from torchtitan.tools.logging import init_logger

    from titan_integration.data import register_tiny_dataset
    from titan_integration.titan03 import keep_timeouts_without_set_timeout, use_cpu_when_no_gpu_03

    split = argv.index("--")
    out_dir, ports, runs, shared = argv[0], argv[1].split(","), argv[2:split], argv[split + 1:]
    assert len(ports) == len(runs), (ports, runs)
    init_logger()
    use_cpu_when_no_gpu_03()
    keep_timeouts_without_set_timeout()
    register_tiny_dataset()
    results = {}
    for spec, port in zip(runs, ports):
        name, _, flags = spec.partition(":")
        results[name] = run([*shared, *(f for f in flags.split(",") if f)], os.path.join(out_dir, name), port)
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
