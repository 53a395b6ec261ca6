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
