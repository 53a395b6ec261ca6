"""Every private torch API in dualpipe_fx._compat still exists and still behaves as used."""
from dualpipe_fx import _compat


def test_runtime_entries_exist_and_have_the_used_members():
    ct = _compat.TorchComputationType
    for name in ("FORWARD", "FULL_BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT", "OVERLAP_F_B",
                 "SEND_F", "RECV_F", "SEND_B", "RECV_B", "REDUCE_GRAD"):
        assert hasattr(ct, name), name
    runtime = _compat.PipelineScheduleRuntime
    for name in ("register_custom_function", "_prepare_schedule_with_comms", "_step_microbatches"):
        assert callable(getattr(runtime, name, None)), name
    for name in ("get_fwd_send_ops", "get_fwd_recv_ops", "get_bwd_send_ops", "get_bwd_recv_ops"):
        assert callable(getattr(_compat.PipelineStageBase, name, None)), name


def test_add_send_recv_lowers_a_two_rank_forward_to_a_send_and_a_recv():
    A, ct = _compat.TorchAction, _compat.TorchComputationType
    actions = {0: [A(0, ct.FORWARD, 0), A(0, ct.FULL_BACKWARD, 0)],
               1: [A(1, ct.FORWARD, 0), A(1, ct.FULL_BACKWARD, 0)]}
    lowered = _compat.add_send_recv(actions, stage_to_rank=lambda s: s, num_stages=2)
    assert [str(a) for a in lowered[0]] == ["0F0", "0SEND_F0", "0RECV_B0", "0B0"]
    assert [str(a) for a in lowered[1]] == ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]


def test_functional_all_to_all_single_has_autograd_and_traces():
    import torch
    import torch.distributed as dist
    from torch.fx.experimental.proxy_tensor import make_fx

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        name = dist.group.WORLD.group_name
        x = torch.arange(6.0).view(3, 2).requires_grad_()
        y = _compat.functional_wait_tensor(_compat.functional_all_to_all_single(x, [3], [3], name))
        (y * 2).sum().backward()
        assert torch.equal(y, x.detach()) and torch.equal(x.grad, torch.full((3, 2), 2.0))
        gm = make_fx(lambda t: _compat.functional_wait_tensor(
            _compat.functional_all_to_all_single(t, [3], [3], name)))(x.detach())
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert targets == ["_c10d_functional.all_to_all_single.default", "_c10d_functional.wait_tensor.default"]
    finally:
        dist.destroy_process_group()


def test_schedule_lowering_entries_are_torch_compute_kinds():
    # lowering maps F/B/I/W/FB onto exactly these torch kinds; their string values are torch's IR letters
    assert [_compat.FORWARD.value, _compat.FULL_BACKWARD.value, _compat.BACKWARD_INPUT.value,
            _compat.BACKWARD_WEIGHT.value, _compat.OVERLAP_F_B.value] == ["F", "B", "I", "W", "OVERLAP_F_B"]
    assert _compat._ComputationType is _compat.TorchComputationType
    assert _compat._Action is _compat.TorchAction


def test_action_tuple_layout_matches_lowering():
    # lowering builds _Action(stage, kind, mb) and _Action(-1, OVERLAP_F_B, None, (f, b))
    f = _compat._Action(3, _compat.FORWARD, 7)
    pair = _compat._Action(-1, _compat.OVERLAP_F_B, None, (f, _compat._Action(2, _compat.FULL_BACKWARD, 1)))
    assert (f.stage_index, f.computation_type, f.microbatch_index, f.sub_actions) == (3, _compat.FORWARD, 7, None)
    assert str(f) == "3F7" and str(pair) == "(3F7;2B1)OVERLAP_F_B"
    assert f.is_compute_op and pair.is_compute_op


def test_data_parallel_entries_place_unshard_reshard_and_reduce_grad_per_stage():
    A, ct = _compat.TorchAction, _compat.TorchComputationType
    for name in ("UNSHARD", "RESHARD", "REDUCE_GRAD"):
        assert hasattr(ct, name), name
    actions = [A(0, ct.FORWARD, 0), A(0, ct.FORWARD, 1), A(0, ct.BACKWARD_INPUT, 0), A(0, ct.BACKWARD_WEIGHT, 0),
               A(0, ct.FULL_BACKWARD, 1)]
    lowered = _compat.add_reduce_grad(_compat.add_unshard_reshard(actions), 2)
    # torch 2.15 pairs each REDUCE_GRAD with a WAIT_REDUCE_GRAD (a no-op for a stage without FSDP)
    wait = ["0WAIT_REDUCE_GRAD"] if hasattr(ct, "WAIT_REDUCE_GRAD") else []
    assert [str(a) for a in lowered] == ["0UNSHARD", "0F0", "0F1", "0I0", "0W0", "0B1", "0REDUCE_GRAD", *wait,
                                         "0RESHARD"]


def test_dispatch_mode_sees_the_callers_tensor_objects():
    """titan_integration/expert_parallel.py recognises a stand-in by identity in each op."""
    import torch

    p = torch.nn.Parameter(torch.empty(4, 3))
    seen = []

    class Watch(_compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func, any(a is p for a in args)))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Watch():
        tmp = p.float()
        torch.nn.init.trunc_normal_(tmp, std=0.02)
        p.copy_(tmp)
    assert (torch.ops.aten.copy_.default, True) in seen
    assert any(is_p for func, is_p in seen if func is not torch.ops.aten.copy_.default)


def test_tp_style_hooks_read_parallelize_modules_closures():
    """runtime/tensor_parallel.py reads each applied style from its hooks' closures: the
    layouts of Colwise/Rowwise/SequenceParallel (partials of their staticmethods) and the
    PrepareModuleInput/Output instances; and the functional collectives it traces exist."""
    import functools

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel(output_layouts=Shard(1)),
                                         "2": SequenceParallel()})
        parallelize_module(model, mesh, {"0": PrepareModuleInput(input_layouts=Shard(1),
                                                                  desired_input_layouts=Replicate())})
        seen = []
        for child in model:
            for table, hook_id, closure in _compat.tp_style_hooks(child):
                assert table[hook_id] is not None and closure["device_mesh"] is mesh
                fn = closure.get("input_fn", closure.get("output_fn"))
                seen.append(fn.func.__qualname__ if isinstance(fn, functools.partial)
                            else type(closure["self"]).__name__)
        assert seen == ["ColwiseParallel._prepare_input_fn", "PrepareModuleInput", "ColwiseParallel._prepare_output_fn",
                        "RowwiseParallel._prepare_input_fn", "RowwiseParallel._prepare_output_fn",
                        "SequenceParallel._prepare_input_fn", "SequenceParallel._prepare_output_fn"]
        name, x = dist.group.WORLD.group_name, torch.arange(4.0)
        for y in (_compat.functional_all_gather(x, 1, name), _compat.functional_reduce_scatter(x, 1, name),
                  _compat.functional_all_reduce(x, name)):
            assert torch.equal(_compat.functional_wait_tensor(y), x)
    finally:
        dist.destroy_process_group()
