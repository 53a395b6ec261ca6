"""torchtitan's own TP plan on the meta model (titan_integration.tensor_parallel), in one process
on a 1-rank TP mesh: the plan's styles and placements, and qwen3's tied embedding and head stay
ONE parameter through the plan and dualpipe_fx's localize (parallelize_module distributes each
module's parameter on its own; trained untied, qwen3 PP=2 x TP=2 left torchtitan at step 2)."""
import pytest

pytest.importorskip("torchtitan", reason="torchtitan is the optional 'titan' extra")

import torch.distributed as dist  # noqa: E402


@pytest.fixture
def tp_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("needs its own 1-rank process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def test_qwen3_plan_keeps_the_tied_embedding_and_head_one_parameter(tp_mesh):
    from torch.distributed.tensor import DTensor, Shard
    from torchtitan.models.qwen3.infra.parallelize import parallelize_qwen3

    from dualpipe_fx.runtime.tensor_parallel import localize
    from tests.titan.unsplit import build
    from titan_integration.tensor_parallel import apply_titan_tp

    model = build("qwen3", on_meta=True)
    assert model.output.weight is model.tok_embeddings.weight  # debugmodel: enable_weight_tying
    assert apply_titan_tp(model, parallelize_qwen3, tp_mesh, "qwen3") == "apply_non_moe_tp"
    weight = model.output.weight
    assert isinstance(weight, DTensor) and weight is model.tok_embeddings.weight
    assert tuple(weight.placements) == (Shard(0),)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    tp = localize(model)
    assert model.output.weight is model.tok_embeddings.weight and not isinstance(model.output.weight, DTensor)
    public = tp.public(dict(model.state_dict(keep_vars=True)))
    assert public["output.weight"] is public["tok_embeddings.weight"]  # one DTensor: one optimizer entry


def test_moe_layers_under_tp_are_refused_naming_the_key(tp_mesh):
    """qwen3's MoE flavor: apply_non_moe_tp leaves the experts and router plain (torchtitan's
    apply_moe_ep_tp shards them); as replicas on sequence shards their grads would be partial."""
    from torchtitan.models.qwen3.infra.parallelize import parallelize_qwen3

    from tests.titan.ac_runs import QWEN3_MOE_CI, register_qwen3_moe_ci
    from tests.titan.unsplit import build
    from titan_integration.tensor_parallel import apply_titan_tp

    register_qwen3_moe_ci()
    model = build("qwen3", on_meta=True, flavor=QWEN3_MOE_CI)
    with pytest.raises(ValueError, match="apply_moe_ep_tp.*parallelism.tensor_parallel_degree = 1"):
        apply_titan_tp(model, parallelize_qwen3, tp_mesh, "qwen3")


def test_llama3_plan_places_every_parameter(tp_mesh):
    from torch.distributed.tensor import DTensor
    from torchtitan.models.llama3.infra.parallelize import parallelize_llama

    from tests.titan.unsplit import build
    from titan_integration.tensor_parallel import apply_titan_tp

    model = build("llama3", on_meta=True)
    assert apply_titan_tp(model, parallelize_llama, tp_mesh, "llama3") == "apply_tp"
    assert all(isinstance(p, DTensor) for p in model.parameters())
