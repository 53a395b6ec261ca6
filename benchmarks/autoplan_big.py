"""``dualpipe_fx.autoplan`` on big models: the plans and the search time on this machine.

torchtitan 0.2.2's llama3 8B and 70B and deepseek_v3 16B and 671B, built on meta (nothing
allocated), bf16, sequences of ``--seq`` tokens (4096), on 8, 64 and 512 H100s (``device="h100"``,
``network="ib-400g"``, a budget of ``--budget-gib`` per rank: 70 GiB of the 80 GB, the rest
for the CUDA context, NCCL's buffers and fragmentation), AdamW, a global batch of
``--per-gpu`` sequences per GPU (8: 256k tokens on 8 GPUs, 2M on 64, 16M on 512). The search
is autoplan's default: pipeline degrees up to 16, every schedule, micro-batch count, recompute
policy, dp mode and, for deepseek_v3, EP degree; ``granularity="auto"`` (these models are cut
between layers, ``planning.layers``).

deepseek_v3 is the flavor as torchtitan builds it on an H100: flex attention with
block-causal masks (the masks of one example micro-batch are passed as ``example_kwargs``, as
the torchtitan plugin does) and grouped GEMMs for the experts (torchtitan turns them off below
SM90, i.e. on this machine, so its ``update_from_config`` is not called; its token padding's
index fill, a Python loop over ``.item()`` values, is traced through
``titan_integration.cpu.use_traceable_permute_indices``: the same indices from static-shape
tensor ops).

Prints one table row per (model, world): the pick, its predicted step and peak, the number of
plans and rejections, the search time; ``--json FILE`` writes them with the top plans' tables.

    PYTHONPATH=$PWD python benchmarks/autoplan_big.py --json /tmp/autoplan_big.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualpipe_fx.api.autoplan import autoplan  # noqa: E402

MODELS = ("llama3-8B", "llama3-70B", "deepseek_v3-16B", "deepseek_v3-671B")
WORLDS = (8, 64, 512)


def _loss(out, target):
    return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())


def build(name: str, seq: int):
    """(model on meta, example kwargs for a batch of one) of ``"llama3-8B"``, ...."""
    family, flavor = name.split("-")
    if family == "llama3":
        from torchtitan.models.llama3 import Transformer, llama3_args

        args = dataclasses.replace(llama3_args[flavor], max_seq_len=seq)
        with torch.device("meta"):
            return Transformer(args).to(torch.bfloat16), {}
    from titan_integration.cpu import use_cpu_when_no_gpu, use_traceable_permute_indices
    from titan_integration.pipelining import example_attention_masks
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model, deepseekv3_args

    use_cpu_when_no_gpu()
    use_traceable_permute_indices()
    args = copy.deepcopy(deepseekv3_args[flavor])
    args.max_seq_len = seq
    args.moe_impl = "standard"  # what update_from_config sets from the default job config
    # grouped GEMMs stay on, as torchtitan builds the model on an H100 (SM90; see the docstring)
    with torch.device("meta"):
        model = DeepSeekV3Model(args).to(torch.bfloat16)
    return model, example_attention_masks(model, torch.zeros(1, seq, dtype=torch.long))


def plan(name: str, world: int, seq: int, per_gpu: int, budget: int, top: int):
    model, kwargs = build(name, seq)
    batch = per_gpu * world
    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    start = time.perf_counter()
    try:
        plans = autoplan(model, _loss, (tokens,), tokens, world_size=world, device="h100", network="ib-400g",
                         memory_budget=budget, top=top, example_kwargs=kwargs or None)
    except ValueError as err:  # nothing fits: the search's answer, with every candidate's reason
        if "no configuration fits" not in str(err):
            raise
        return str(err), time.perf_counter() - start
    return plans, time.perf_counter() - start


def _least_over(message: str) -> str:
    """The candidate that misses the budget by the least, from autoplan's no-fit message (a
    family pruned before any cut: its average kept bytes over the budget)."""
    overs = []
    for line in message.splitlines():
        if "out of memory on rank" in line:
            by = line.split(" by ")[1].replace("at least ", "")
            overs.append((float(by.split(" GiB")[0].replace(",", "")), line.strip()))
        elif "alone average" in line:
            mean = float(line.split("average ")[1].split(" GiB")[0].replace(",", ""))
            budget = float(line.split("(budget ")[1].split(" GiB")[0].replace(",", ""))
            overs.append((mean - budget, line.strip()))
    return min(overs)[1] if overs else message.splitlines()[1].strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--per-gpu", type=int, default=8, help="sequences per GPU in the global batch")
    parser.add_argument("--budget-gib", type=float, default=70.0)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    budget = int(args.budget_gib * 2 ** 30)
    rows, out = [], []
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    for name in args.models:
        for world in args.worlds:
            load = os.getloadavg()[0]
            plans, seconds = plan(name, world, args.seq, args.per_gpu, budget, args.top)
            if isinstance(plans, str):
                row = {"model": name, "world": world, "global_batch": args.per_gpu * world, "fits": False,
                       "least_over": _least_over(plans), "search_s": seconds, "load_average": load}
                rows.append(row)
                out.append(row)
                print(f"== {name} on {world}: nothing fits ({row['least_over']}); searched in {seconds:.1f} s "
                      f"(load {load:.2f})", flush=True)
                continue
            best = plans[0]
            row = {"model": name, "world": world, "global_batch": args.per_gpu * world, "pp": best.pp_degree,
                   "dp": best.dp_degree, "dp_mode": best.dp_mode, "ep": best.ep_degree, "schedule": best.schedule,
                   "C": best.num_microbatches, "mb": best.microbatch_size, "recompute": best.recompute,
                   "step_s": best.predicted_step_s, "bubble": best.bubble_ratio,
                   "peak_GiB": best.peak_bytes / 2 ** 30, "tokens_per_s": best.samples_per_s * args.seq,
                   "rejected": len(plans.rejected), "search_s": seconds, "load_average": load}
            rows.append(row)
            out.append({**row, "table": plans.table().splitlines()[:args.top + 2]})
            print(plans.table().splitlines()[0])
            print("\n".join(plans.table().splitlines()[1:args.top + 2]), flush=True)
            print(f"== {name} on {world}: searched in {seconds:.1f} s (load {load:.2f})", flush=True)
    print("\n| model | H100s | global batch | pick: pp x dp (mode, ep) | schedule | C x mb | recompute | "
          "step s | bubble | peak GiB | rejected | search s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r.get("fits", True):
            print(f"| {r['model']} | {r['world']} | {r['global_batch']} | nothing fits: {r['least_over']} | "
                  f"| | | | | | | {r['search_s']:.1f} |")
            continue
        dp = f"{r['dp']} ({r['dp_mode']}, ep {r['ep']})" if r["dp"] > 1 else "1"
        print(f"| {r['model']} | {r['world']} | {r['global_batch']} | {r['pp']} x {dp} | {r['schedule']} | "
              f"{r['C']} x {r['mb']} | {r['recompute']} | {r['step_s']:.2f} | {r['bubble']:.3f} | "
              f"{r['peak_GiB']:.1f} | {r['rejected']} | {r['search_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": out, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
