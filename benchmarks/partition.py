"""Stage split of the 8-layer llama-style decoder: our balanced cut against torchtitan's.

For 4 and 8 stages it prints, side by side:

1. **FLOP balance** (largest stage's forward FLOPs over the mean) of ``split_stages``
   (required <= 1.05) and of a uniform split by layer count made the way torchtitan's
   ``generate_llm_fqn_per_model_part`` makes it (default ``input_weight =
   output_weight = 1``: the embedding counts as one layer in the first stage, norm +
   LM head as one layer in the last; layers spread evenly, the first stages taking the
   remainder; the loss runs on the last stage). The torchtitan split is rebuilt with
   ``split_stages(..., split_points=<its stage boundaries>)``, so both are costed and cut
   by the same code.
2. **Cut bytes**: activation bytes crossing each cut per micro-batch.
3. **dI cost**: per stage, FLOPs of ``backward_input`` over the FLOPs of the stage's full
   backward (counted independently, with ``torch.autograd.grad`` under
   ``FlopCounterMode``), and ``(I + W) / full`` as a check that nothing is computed twice.
   Stage 0 has no differentiable input, so its I is empty and everything is W.
4. **Wall time** of ``capture``, ``split_stages`` and ``split_backward`` (all stages);
   required < 10 s in total.

``--json FILE`` writes all figures. Never asserts; prints ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualpipe_fx.examples import LlamaConfig, LlamaDecoder, llama_batch, llama_loss  # noqa: E402
from passes.capture import capture  # noqa: E402
from passes.cost_model import extra_flop_formulas, node_costs  # noqa: E402
from passes.split_backward import split_backward  # noqa: E402
from passes.split_stages import split_stages  # noqa: E402


def titan_fqns_per_stage(num_stages: int, num_layers: int, input_weight: int = 1,
                         output_weight: int = 1) -> list[list[str]]:
    """Module FQNs per stage, following torchtitan's ``generate_llm_fqn_per_model_part``."""
    if num_stages == 1:
        return [["tok_embeddings", *(f"layers.{i}" for i in range(num_layers)), "norm", "output"]]
    effective = num_layers + input_weight + output_weight
    per_stage, extra = divmod(effective, num_stages)
    if per_stage < max(input_weight, output_weight, 1):
        raise ValueError(f"torchtitan refuses {num_stages} stages for {num_layers} layers")
    stages, layer = [], 0
    for s in range(num_stages):
        quota = per_stage + (1 if s < extra else 0)
        quota -= input_weight if s == 0 else output_weight if s == num_stages - 1 else 0
        mods = ["tok_embeddings"] if s == 0 else []
        take = min(quota, num_layers - layer)
        mods += [f"layers.{i}" for i in range(layer, layer + take)]
        layer += take
        if s == num_stages - 1:
            mods += ["norm", "output"]
        stages.append(mods)
    return stages


def _torchtitan_agrees(num_stages: int, num_layers: int, ours: list[list[str]]) -> object:
    """True/False against torchtitan's own function when it is installed, else None."""
    try:
        from torchtitan.distributed.pipeline_parallel import generate_llm_fqn_per_model_part
    except Exception:  # noqa: BLE001 - torchtitan is an optional extra
        return None
    return generate_llm_fqn_per_model_part(num_stages, num_layers) == ours


def _full_backward_flops(stage_gm, params: dict, buffers: dict, acts: dict, externals: dict) -> int:
    """FLOPs of plain autograd's backward through one stage graph (the reference for dI)."""
    args, wrt = [], []
    for ph in (n for n in stage_gm.graph.nodes if n.op == "placeholder"):
        kind, name = ph.meta["dpfx_kind"], ph.meta["dpfx_name"]
        value = {"param": params, "buffer": buffers, "activation": acts}.get(kind, externals)[name]
        if kind in ("param", "activation") and value.is_floating_point():
            value = value.detach().requires_grad_(True)
            wrt.append(value)
        args.append(value)
    outs = stage_gm(*args)
    is_last = "target" in externals and any(
        n.meta.get("dpfx_kind") == "target" for n in stage_gm.graph.nodes if n.op == "placeholder")
    diff = [outs[0]] if is_last else [o for o in outs if o.requires_grad]
    # the same formulas node_costs uses (torch's counter lacks CPU flash attention's)
    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        torch.autograd.grad(diff, wrt, [torch.ones_like(o) for o in diff], allow_unused=True)
    return counter.get_total_flops(), outs


def _graph_flops(gm) -> float:
    return sum(c.flops for c in node_costs(gm).values())


def _di_ratios(part, stage_graphs, model, tokens, target) -> list[dict]:
    params = {k: v.detach() for k, v in model.named_parameters(remove_duplicate=False)}
    buffers = dict(model.named_buffers(remove_duplicate=False))
    externals = {"input:0": tokens, "target": target}
    acts, rows = {}, []
    for gm, sg in zip(part.stages, stage_graphs):
        full, outs = _full_backward_flops(gm, params, buffers, acts, externals)
        i_flops = _graph_flops(sg.backward_input.gm)
        w_flops = _graph_flops(sg.backward_weight.gm)
        rows.append({"stage": sg.index, "full_bwd_flops": full, "I_flops": i_flops, "W_flops": w_flops,
                     "dI_ratio": i_flops / full if full else 0.0,
                     "I_plus_W_over_full": (i_flops + w_flops) / full if full else 0.0})
        names = gm.graph.find_nodes(op="output")[0].meta["dpfx_output_names"]
        acts = {n: o.detach() for n, o in zip(names, outs)}
    return rows


def _timed(fn):
    """``fn()``, its wall seconds and its CPU seconds (this process; the machine may be shared)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(num_layers: int = 8, stage_counts=(4, 8)) -> dict:
    model = LlamaDecoder(LlamaConfig(n_layers=num_layers))
    tokens, target = llama_batch(model.cfg, batch=2, seq=16)
    cap, capture_s, capture_cpu = _timed(lambda: capture(model, llama_loss, (tokens,), target))
    results = {"model": f"LlamaDecoder({model.cfg})", "capture_s": capture_s,
               "capture_cpu_s": capture_cpu, "splits": []}
    for num_stages in stage_counts:
        part, split_s, split_cpu = _timed(lambda: split_stages(cap, num_stages))
        graphs, split_backward_s, split_backward_cpu = _timed(
            lambda: [split_backward(gm) for gm in part.stages])
        fqns = titan_fqns_per_stage(num_stages, num_layers)
        titan = split_stages(cap, num_stages, split_points=[mods[0] for mods in fqns[1:]])
        results["splits"].append({
            "num_stages": num_stages,
            "balance": part.balance, "stage_flops": list(part.costs), "cut_bytes": list(part.cut_bytes),
            "titan_balance": titan.balance, "titan_stage_flops": list(titan.costs),
            "titan_cut_bytes": list(titan.cut_bytes), "titan_modules": fqns,
            "titan_modules_match_torchtitan": _torchtitan_agrees(num_stages, num_layers, fqns),
            "split_s": split_s, "split_backward_s": split_backward_s,
            "total_s": capture_s + split_s + split_backward_s,
            "split_cpu_s": split_cpu, "split_backward_cpu_s": split_backward_cpu,
            "total_cpu_s": capture_cpu + split_cpu + split_backward_cpu,
            "dI": _di_ratios(part, graphs, model, tokens, target),
        })
    return results


def _print(results: dict) -> None:
    print(results["model"])
    print(f"capture: {results['capture_s']:.2f} s")
    for r in results["splits"]:
        s = r["num_stages"]
        print(f"\n== {s} stages ==")
        print(f"FLOP balance (max/mean): ours {r['balance']:.3f}   torchtitan uniform {r['titan_balance']:.3f}"
              f"   ratio titan/ours {r['titan_balance'] / r['balance']:.3f}")
        print(f"  torchtitan stages: {[m[0] + '..' + m[-1] for m in r['titan_modules']]}"
              f" (same as torchtitan's function: {r['titan_modules_match_torchtitan']})")
        print(f"cut bytes: ours {r['cut_bytes']} (sum {sum(r['cut_bytes'])})   "
              f"torchtitan {r['titan_cut_bytes']} (sum {sum(r['titan_cut_bytes'])})")
        print(f"{'stage':>5} {'ours MFLOP':>11} {'titan MFLOP':>12} {'full bwd MFLOP':>15} "
              f"{'I MFLOP':>8} {'W MFLOP':>8} {'I/full':>7} {'(I+W)/full':>10}")
        for i, d in enumerate(r["dI"]):
            print(f"{i:>5} {r['stage_flops'][i] / 1e6:>11.2f} {r['titan_stage_flops'][i] / 1e6:>12.2f} "
                  f"{d['full_bwd_flops'] / 1e6:>15.2f} {d['I_flops'] / 1e6:>8.2f} {d['W_flops'] / 1e6:>8.2f} "
                  f"{d['dI_ratio']:>7.3f} {d['I_plus_W_over_full']:>10.3f}")
        print(f"wall time: capture {results['capture_s']:.2f} s + split {r['split_s']:.2f} s + "
              f"split_backward {r['split_backward_s']:.2f} s = {r['total_s']:.2f} s (required < 10 s)")
        print(f"CPU time:  capture {results['capture_cpu_s']:.2f} s + split {r['split_cpu_s']:.2f} s + "
              f"split_backward {r['split_backward_cpu_s']:.2f} s = {r['total_cpu_s']:.2f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--stages", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args(argv)
    results = measure(args.layers, tuple(args.stages))
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
