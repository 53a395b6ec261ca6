"""titan_integration.init: torchtitan's whole-model init_weights run on a rank's share only
gives that share bitwise the values of torchtitan's non-pipelined init (same seed), keeps
the tensor objects the stages read, holds no other rank's tensor, and leaves the RNG alone."""
import functools

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan", reason="torchtitan is the optional 'titan' extra")

from dualpipe_fx.runtime.materialize import materialize  # noqa: E402
from tests.titan.unsplit import build  # noqa: E402
from titan_integration.init import init_like_unsplit  # noqa: E402
from titan_integration.pipelining import _zeros_until_init_weights  # noqa: E402

SEED = 42  # the example job file's debug.seed

# DualPipeV on 2 ranks of the 6-layer debug model: rank 0 holds both ends, rank 1 the middle
SHARES = {
    "rank0": ("tok_embeddings.", "layers.0.", "layers.1.", "layers.4.", "layers.5.", "norm.", "output.",
              "freqs_cis"),
    "rank1": ("layers.2.", "layers.3.", "freqs_cis"),
}


def _everything(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@functools.cache
def _reference(name: str) -> dict[str, torch.Tensor]:
    return _everything(build(name, seed=SEED))


@pytest.mark.parametrize("name,share", [("llama3", "rank0"), ("llama3", "rank1"), ("qwen3", "rank1")])
def test_a_ranks_share_gets_the_unsplit_values_bitwise(name, share):
    reference = _reference(name)
    model = build(name, on_meta=True)
    names = {fqn for fqn in _everything(model) if fqn.startswith(SHARES[share])}
    materialize(model, names, "cpu", param_init_fn=_zeros_until_init_weights)  # as compile() is called
    held = {fqn: t for fqn, t in _everything(model).items() if not t.is_meta}
    assert set(held) == names
    rng = torch.get_rng_state()
    init_like_unsplit(model, lambda: model.init_weights(buffer_device=None), seed=SEED, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)
    after = _everything(model)
    for fqn, t in after.items():
        if fqn in names:
            assert after[fqn] is held[fqn], fqn  # the objects the stage graphs read
            assert torch.equal(t, reference[fqn]), fqn  # bitwise (freqs_cis reassigned by init: copied)
        else:
            assert t.is_meta, fqn  # no other rank's tensor stays allocated


def test_reassigned_tensor_of_another_shape_is_refused():
    model = nn.Linear(3, 2)
    model.register_buffer("table", torch.zeros(4), persistent=False)

    def init():
        model.table = torch.ones(5)

    with pytest.raises(ValueError, match="'table'.*same shape and dtype"):
        init_like_unsplit(model, init, seed=0, device="cpu")
    assert model.table.shape == (4,)


def test_meta_tensors_draw_as_if_allocated():
    """A parameter after a meta one gets the value it gets when both are allocated."""
    torch.manual_seed(1)
    full = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    with torch.device("meta"):
        part = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    part[1].to_empty(device="cpu")

    def init(m):
        return lambda: [nn.init.trunc_normal_(p, std=0.5) for p in m.parameters()]

    init_like_unsplit(full, init(full), seed=3, device="cpu")
    init_like_unsplit(part, init(part), seed=3, device="cpu")
    assert part[0].weight.is_meta and isinstance(part[0].weight, nn.Parameter)
    assert torch.equal(part[1].weight, full[1].weight) and torch.equal(part[1].bias, full[1].bias)


_EXPERT_SHARE_CHECK = """
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from dualpipe_fx.runtime.materialize import materialize
from tests.titan.unsplit import build
from titan_integration.cpu import use_int_histc_on_cpu
from titan_integration.expert_parallel import full_experts, shard_experts
from titan_integration.init import init_like_unsplit
from titan_integration.pipelining import _zeros_until_init_weights
use_int_histc_on_cpu()
reference = dict(build("deepseek_v3", seed=42).named_parameters())
for rank in (0, 1):
    dist.init_process_group("fake", rank=rank, world_size=2, store=FakeStore())
    model = build("deepseek_v3", on_meta=True)
    experts = shard_experts(model, dist.group.WORLD)
    share = {n for n in dict(model.named_parameters()) if n.startswith(("layers.1.", "layers.2."))}
    materialize(model, share, "cpu", param_init_fn=_zeros_until_init_weights)
    held = {n: p for n, p in model.named_parameters() if not p.is_meta}
    with full_experts(model):
        init_like_unsplit(model, lambda: model.init_weights(buffer_device=None), seed=42, device="cpu")
    after = dict(model.named_parameters())
    assert set(held) == share and any(n in experts for n in share)
    for name in share:
        want = reference[name]
        if name in experts:
            n = want.shape[0] // 2
            assert after[name].shape[0] == n, name
            want = want[rank * n:(rank + 1) * n]
        assert after[name] is held[name] and torch.equal(after[name], want), (rank, name)
    assert all(p.is_meta for n, p in after.items() if n not in share)
    dist.destroy_process_group()
print("ok")
"""


@pytest.mark.long  # a torchtitan model built whole on CPU, ~10 s: the long tier (docs/contributing.md)
def test_expert_parallel_rank_keeps_its_rows_of_the_unsplit_init():
    """deepseek_v3 with its experts split over 2 EP ranks (torch's fake process group, one
    process per check): each rank's share, expert slices included, gets bitwise the rows of
    torchtitan's unsplit init, though the full expert weights only ever exist on meta (the
    init's shared scratch)."""
    import os
    import subprocess
    import sys

    from tests.titan.unsplit import REPO

    proc = subprocess.run([sys.executable, "-c", _EXPERT_SHARE_CHECK], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
