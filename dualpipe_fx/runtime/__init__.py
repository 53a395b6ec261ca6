"""Execution of per-rank programs on torch.distributed.pipelining (the only package touching torch.distributed)."""
from dualpipe_fx.runtime.errors import PeerTimeoutError
from dualpipe_fx.runtime.pipeline import Pipeline

__all__ = ["Pipeline", "PeerTimeoutError"]
