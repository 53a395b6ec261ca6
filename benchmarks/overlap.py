"""Overlapped F&B (passes.multiplex) against F then B, on the MoE model, with slow links.

Two ranks (gloo). Where it can (root, ``ip``, ``tc``), the benchmark creates two network
namespaces joined by a veth pair whose egress is rate-limited with a ``tbf`` qdisc, so a
transfer takes wall time without taking CPU; otherwise it falls back to loopback TCP.
Nothing sleeps in the compute thread.

Measured, each as the median of ``--iters`` runs after warm-up, sequential and
multiplexed runs alternating:

1. **Expert all_to_all** (both ranks, EP group of 2): the pair F(stage 0) & B(stage 1)
   of the MoE decoder split into 2 stages; each chunk holds two all_to_alls. The time
   spent inside ``wait_tensor`` is the exposed communication; in F then B each wait
   follows its issue at once, so it is the whole communication time ``C``.
   overlap = (C - exposed in the multiplexed graph) / C.
2. **Pipeline send/recv** (rank 0 computes, rank 1 receives): a pair F(stage 1) &
   B(stage 2) of the dense (EP=1) model in 4 stages; the pair's output activation and
   input grad go to rank 1. F then B sends both after the pair (what torch's runtime
   does after an OVERLAP_F_B action); the multiplexed graph's ``send_hook`` starts each
   send as soon as its value is ready. Rank 1 times the arrival of both values from a
   common barrier: exposed = arrival - pair time alone; overlap = (C - exposed) / C,
   with C the arrival time of the sends alone.
3. **No communication**: the dense pair in one process; the ratio is the median over
   iterations of (F then B) / multiplexed for two runs next to each other.

Prints a ratio table; ``--json FILE`` writes the figures (``overlap_fraction``: the expert
all_to_all's, ``numerics_equal``: every multiplexed result bitwise equal to F then B).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = ("dpfx_ov0", "dpfx_ov1")
VETH = ("dpfxov0", "dpfxov1")
ADDRS = ("10.211.0.1", "10.211.0.2")


# ----------------------------------------------------------------------------- the network
def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def setup_netns(rate_mbit: float) -> bool:
    """Two namespaces and a rate-limited veth pair; False (and nothing left) if not possible."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    teardown_netns()
    try:
        for ns in NS:
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
        for ns, dev, addr in zip(NS, VETH, ADDRS):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "2s")
        return True
    except (subprocess.CalledProcessError, OSError):
        teardown_netns()
        return False


def teardown_netns() -> None:
    for ns in NS:
        subprocess.run(("ip", "netns", "del", ns), capture_output=True)


# ----------------------------------------------------------------------------- timing tools
def _timed_waits(gm, log: list):
    """A copy of ``gm`` whose wait_tensor nodes add the seconds they block to ``log``."""
    import torch
    from passes._compat import is_functional_wait

    def timed_wait(x):
        start = time.perf_counter()
        out = torch.ops._c10d_functional.wait_tensor.default(x)
        log.append(time.perf_counter() - start)
        return out

    gm = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
    for node in gm.graph.nodes:
        if is_functional_wait(node):
            node.target = timed_wait
    gm.recompile()
    return gm


def _median(xs):
    return statistics.median(xs) if xs else 0.0


def _equal(a, b) -> bool:
    import torch
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                                    for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the pairs
def _stages(model, cfg, batch, seq, num_stages, seed):
    from dualpipe_fx.examples.moe import moe_batch, moe_loss
    from passes.capture import capture
    from passes.split_backward import split_backward
    from passes.split_stages import split_stages

    x, y = moe_batch(cfg, batch, seq, seed=seed)
    part = split_stages(capture(model, moe_loss, (x,), y), num_stages)
    sg = [split_backward(g, index=i) for i, g in enumerate(part.stages)]
    named = dict(model.named_parameters())
    params = [[named[n].detach() for n in s.param_names] for s in sg]
    acts = [(x,)]
    saved = []
    with __import__("torch").no_grad():
        for i, s in enumerate(sg):
            outs, sv = s.forward(params[i], list(acts[-1]) + ([y] if i == num_stages - 1 else []))
            acts.append(tuple(outs))
            saved.append(sv)
    return sg, params, acts, saved, y


class Pair:
    """F of stage ``a`` (on fresh inputs) & B of stage ``b`` (on saved values): both ways."""

    def __init__(self, sg, params, acts, saved, y, a, b, grads):
        from dualpipe_fx.runtime.overlap import _grad_args
        from passes.multiplex import multiplex

        self.f, self.i, self.w = sg[a].forward.gm, sg[b].backward_input.gm, sg[b].backward_weight.gm
        self.n_gi = sg[b].backward_input.num_grad_inputs
        self.f_args = list(params[a]) + list(acts[a]) + ([y] if a == len(sg) - 1 else [])
        self.b_args = list(saved[b]) + _grad_args(sg[b].backward_input, grads)
        self.gm = multiplex(sg[a].forward, sg[b].backward_input, sg[b].backward_weight)
        self.n_f = sg[a].forward.num_outputs
        self.info = self.gm.meta["dpfx_multiplex"]

    def sequential(self, f, i, w, marks=None):
        f_res = f(*self.f_args)
        if marks is not None:  # when F ended, to split the time between the chunks
            marks.append(time.perf_counter())
        b_res = i(*self.b_args)
        return tuple(f_res) + tuple(b_res[:self.n_gi]) + tuple(w(*b_res[self.n_gi:]))

    def sends(self, results):
        """The values that leave the pair: F's outputs, then the B's grad_inputs."""
        f_res, b_res = self.info.split_results(results)
        return [t for t in tuple(f_res[:self.n_f]) + tuple(b_res[:self.n_gi]) if t is not None]


# ----------------------------------------------------------------------------- worker parts
def bench_all_to_all(args, rank):
    """Part 1 on both ranks; returns per-rank medians and numerics."""
    import torch
    import torch.distributed as dist
    from dualpipe_fx.examples.moe import MoEDecoder

    cfg = _config(args)
    model = MoEDecoder(cfg, seed=0, group=dist.group.WORLD)
    sg, params, acts, saved, y = _stages(model, cfg, args.batch, args.seq, 2, seed=rank)
    pair = Pair(sg, params, acts, saved, y, 0, 1, (torch.ones(()),))
    log_s, log_m = [], []
    seq = (_timed_waits(pair.f, log_s), _timed_waits(pair.i, log_s), _timed_waits(pair.w, log_s))
    mx = _timed_waits(pair.gm, log_m)
    rows = {"seq": [], "mx": [], "wait_seq": [], "wait_mx": [], "wait_seq_f": [], "wait_seq_b": [],
            "cpu_seq": [], "cpu_mx": [], "f_seq": []}
    with torch.no_grad():
        equal = _equal(pair.sequential(*seq), mx(*pair.f_args, *pair.b_args))
        for it in range(args.warmup + args.iters):
            for kind in ("seq", "mx"):
                log = log_s if kind == "seq" else log_m
                log.clear()
                dist.barrier()
                start, cpu, marks = time.perf_counter(), time.thread_time(), []
                pair.sequential(*seq, marks=marks) if kind == "seq" else mx(*pair.f_args, *pair.b_args)
                elapsed = time.perf_counter() - start
                if it >= args.warmup:
                    rows[kind].append(elapsed)
                    rows["cpu_" + kind].append(time.thread_time() - cpu)
                    rows["wait_" + kind].append(sum(log))
                    if kind == "seq":  # F's two waits come first, then B's two
                        rows["f_seq"].append(marks[0] - start)
                        rows["wait_seq_f"].append(sum(log[:2]))
                        rows["wait_seq_b"].append(sum(log[2:]))
    return {k: _median(v) for k, v in rows.items()} | {"numerics_equal": equal}


def bench_pipeline_sends(args, rank):
    """Part 2: rank 0 runs the pair and sends; rank 1 times when the data has arrived."""
    import torch
    import torch.distributed as dist
    from dualpipe_fx.examples.moe import MoEDecoder

    cfg = _config(args)
    sg, params, acts, saved, y = _stages(MoEDecoder(cfg, seed=0), cfg, args.batch, args.seq, 4, seed=1)
    grads = tuple(torch.ones_like(t) for t in acts[3])
    pair = Pair(sg, params, acts, saved, y, 1, 2, grads)
    with torch.no_grad():
        ref = pair.sequential(pair.f, pair.i, pair.w)
    sends = pair.sends(ref)
    rows = {"alone": [], "comm": [], "seq": [], "mx": []}
    equal = True
    for it in range(args.warmup + args.iters):
        for kind in rows:
            dist.barrier()
            start = time.perf_counter()
            if rank == 1:  # arrival of every value at the peer, from the common start
                if kind != "alone":
                    for w in [dist.irecv(torch.empty_like(t), src=0) for t in sends]:
                        w.wait()
            else:
                out = _send_run(pair, kind, sends)
                equal = equal and (kind != "mx" or _equal(out, ref))
            if it >= args.warmup:
                rows[kind].append(time.perf_counter() - start)
    return {k: _median(v) for k, v in rows.items()} | {"numerics_equal": equal}


def _send_run(pair, kind, sends):
    """One run on the sending rank; its results (None for the sends alone)."""
    import torch
    import torch.distributed as dist

    works, out = [], None
    with torch.no_grad():
        if kind == "comm":
            works = [dist.isend(t, dst=1) for t in sends]
        elif kind in ("alone", "seq"):
            out = pair.sequential(pair.f, pair.i, pair.w)
            if kind == "seq":  # what the runtime does: SEND_F / SEND_B after the action
                works = [dist.isend(t.contiguous(), dst=1) for t in pair.sends(out)]
        else:
            pair.gm.send_hook.callback = lambda kind_, i, t: works.append(dist.isend(t.contiguous(), dst=1))
            out = pair.gm(*pair.f_args, *pair.b_args)
            pair.gm.send_hook.callback = None
    for w in works:
        w.wait()
    return out


def bench_no_comm(args):
    """Part 3 (one process): the dense pair, F then B against the multiplexed graph."""
    import torch
    from dualpipe_fx.examples.moe import MoEDecoder

    cfg = _config(args)
    sg, params, acts, saved, y = _stages(MoEDecoder(cfg, seed=0), cfg, args.batch, args.seq, 2, seed=2)
    pair = Pair(sg, params, acts, saved, y, 0, 1, (torch.ones(()),))
    rows = {"seq": [], "mx": [], "ratio": []}
    with torch.no_grad():
        equal = _equal(pair.sequential(pair.f, pair.i, pair.w), pair.gm(*pair.f_args, *pair.b_args))
        for it in range(args.warmup + 3 * args.iters):
            took = {}
            for kind in ("seq", "mx") if it % 2 else ("mx", "seq"):
                start = time.perf_counter()
                pair.sequential(pair.f, pair.i, pair.w) if kind == "seq" else pair.gm(*pair.f_args, *pair.b_args)
                took[kind] = time.perf_counter() - start
            if it >= args.warmup:
                for kind, t in took.items():
                    rows[kind].append(t)
                # Runs next to each other share the machine's load: their ratio cancels its drift.
                rows["ratio"].append(took["seq"] / took["mx"])
    return {k: _median(v) for k, v in rows.items()} | {"numerics_equal": equal}


def _config(args):
    from dualpipe_fx.examples.moe import MoEConfig

    return MoEConfig(vocab_size=256, dim=args.dim, n_layers=2, n_heads=4, n_experts=4, top_k=2,
                     expert_hidden=2 * args.dim)


def worker(args) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                            world_size=2, timeout=datetime.timedelta(seconds=300))
    try:
        result = {"all_to_all": bench_all_to_all(args, args.rank),
                  "pipeline": bench_pipeline_sends(args, args.rank)}
        if args.rank == 0:
            result["no_comm"] = bench_no_comm(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, netns: bool, tmp: str) -> list[dict]:
    port = _free_port()
    master = ADDRS[0] if netns else "127.0.0.1"
    procs, outs = [], []
    for rank in range(2):
        out = os.path.join(tmp, f"rank{rank}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(rank), "--master", master,
               "--port", str(port), "--out", out, "--dim", str(args.dim), "--batch", str(args.batch),
               "--seq", str(args.seq), "--iters", str(args.iters), "--warmup", str(args.warmup)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if netns:
            cmd = ["ip", "netns", "exec", NS[rank]] + cmd
            env["GLOO_SOCKET_IFNAME"] = VETH[rank]
        procs.append(subprocess.Popen(cmd, env=env))
        outs.append(out)
    try:
        for p in procs:
            if p.wait(timeout=args.timeout) != 0:
                raise RuntimeError(f"benchmark worker failed with exit code {p.returncode}")
    finally:
        for p in procs:  # never leave a straggler behind
            if p.poll() is None:
                p.kill()
    results = []
    for out in outs:
        with open(out) as f:
            results.append(json.load(f))
    return results


def _fraction(total: float, exposed: float) -> float:
    return max(0.0, min(1.0, (total - exposed) / total)) if total > 0 else 0.0


def summarize(results: list[dict], transport: str) -> dict:
    a2a = [r["all_to_all"] for r in results]
    comm = statistics.mean(r["wait_seq"] for r in a2a)
    exposed = statistics.mean(r["wait_mx"] for r in a2a)
    seq, mx = statistics.mean(r["seq"] for r in a2a), statistics.mean(r["mx"] for r in a2a)
    # pair time on the sender; arrival times (from the common start) on the receiver
    alone, arrive, none = results[0]["pipeline"]["alone"], results[1]["pipeline"], results[0]["no_comm"]
    pipe = {"alone": alone, "comm": arrive["comm"], "seq": arrive["seq"], "mx": arrive["mx"]}
    pipe_exposed_mx = max(0.0, pipe["mx"] - alone)
    pipe_exposed_seq = max(0.0, pipe["seq"] - alone)
    f_comm = statistics.mean(r["wait_seq_f"] for r in a2a)
    b_comm = statistics.mean(r["wait_seq_b"] for r in a2a)
    compute = seq - comm
    f_compute = statistics.mean(r["f_seq"] for r in a2a) - f_comm
    b_compute = compute - f_compute
    return {
        "transport": transport,
        "overlap_fraction": _fraction(comm, exposed),
        "numerics_equal": all(r["all_to_all"]["numerics_equal"] and r["pipeline"]["numerics_equal"]
                              for r in results) and none["numerics_equal"],
        "all_to_all": {"fb_seq_s": seq, "fb_multiplexed_s": mx, "speedup": seq / mx, "comm_s": comm,
                       "exposed_comm_multiplexed_s": exposed, "comm_f_s": f_comm, "comm_b_s": b_comm,
                       "compute_s": compute, "compute_f_s": f_compute, "compute_b_s": b_compute,
                       "comm_le_other_compute": f_comm <= b_compute and b_comm <= f_compute,
                       "overlap_fraction": _fraction(comm, exposed),
                       "compute_thread_cpu_seq_s": statistics.mean(r["cpu_seq"] for r in a2a),
                       "compute_thread_cpu_multiplexed_s": statistics.mean(r["cpu_mx"] for r in a2a)},
        "pipeline_send": {"pair_alone_s": pipe["alone"], "sends_alone_s": pipe["comm"],
                          "fb_then_send_s": pipe["seq"], "fb_multiplexed_early_send_s": pipe["mx"],
                          "overlap_fraction_seq": _fraction(pipe["comm"], pipe_exposed_seq),
                          "overlap_fraction": _fraction(pipe["comm"], pipe_exposed_mx)},
        "no_comm": {"fb_seq_s": none["seq"], "fb_multiplexed_s": none["mx"],
                    "speed_ratio": none["ratio"]},
        "per_rank": results,
    }


def print_table(s: dict) -> None:
    a, p, n = s["all_to_all"], s["pipeline_send"], s["no_comm"]
    ms = lambda x: f"{1e3 * x:8.2f} ms"  # noqa: E731
    print(f"transport: {s['transport']}")
    print(f"{'case':<34}{'F then B':>12}{'multiplexed':>14}{'ratio':>8}{'overlap':>9}")
    print(f"{'expert all_to_all (2 EP ranks)':<34}{ms(a['fb_seq_s']):>12}{ms(a['fb_multiplexed_s']):>14}"
          f"{a['speedup']:>7.2f}x{a['overlap_fraction']:>9.2f}")
    print(f"{'pipeline send (pair + sends)':<34}{ms(p['fb_then_send_s']):>12}{ms(p['fb_multiplexed_early_send_s']):>14}"
          f"{p['fb_then_send_s'] / p['fb_multiplexed_early_send_s']:>7.2f}x{p['overlap_fraction']:>9.2f}")
    print(f"{'no communication':<34}{ms(n['fb_seq_s']):>12}{ms(n['fb_multiplexed_s']):>14}{n['speed_ratio']:>7.2f}x{'-':>9}")
    print(f"all_to_all: comm {ms(a['comm_s'])} (F {ms(a['comm_f_s'])}, B {ms(a['comm_b_s'])}), "
          f"compute {ms(a['compute_s'])}, exposed when multiplexed {ms(a['exposed_comm_multiplexed_s'])}")
    print(f"all_to_all: compute F {ms(a['compute_f_s'])}, B {ms(a['compute_b_s'])}; each chunk's comm <= "
          f"the other's compute: {a['comm_le_other_compute']}")
    print(f"all_to_all: compute thread CPU time {ms(a['compute_thread_cpu_seq_s'])} (F then B), "
          f"{ms(a['compute_thread_cpu_multiplexed_s'])} (multiplexed): wall time beyond it is CPU share lost to load")
    print(f"pipeline: pair alone {ms(p['pair_alone_s'])}, sends alone {ms(p['sends_alone_s'])} (arrival); "
          f"overlap F then B {p['overlap_fraction_seq']:.2f}, multiplexed {p['overlap_fraction']:.2f}")
    print(f"numerics equal (bitwise): {s['numerics_equal']}; "
          f"no-comm ratio {n['speed_ratio']:.3f} (target >= 0.98)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--rate-mbit", type=float, default=400.0, help="veth rate limit (netns mode)")
    parser.add_argument("--loopback", action="store_true", help="skip the network namespaces")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--master", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    netns = not args.loopback and setup_netns(args.rate_mbit)
    transport = f"veth in 2 network namespaces, tbf {args.rate_mbit:g} Mbit/s" if netns else "loopback TCP"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = summarize(_launch(args, netns, tmp), transport)
    finally:
        if netns:
            teardown_netns()
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
