"""torchtitan's own non-pipelined model and init, in this process: the reference values."""
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOML = os.path.join(REPO, "titan_integration", "configs", "llama3_debug_dualpipe.toml")


def build(name: str = "llama3", *, seed: int = 42, on_meta: bool = False, flavor: str = "debugmodel"):
    """``name``/``flavor`` as the trainer builds it for the example job file: on meta, or (default)
    allocated on the CPU and initialised as the non-pipelined trainer does (``to_empty``, then
    ``init_weights`` right after ``set_determinism``'s ``torch.manual_seed(seed)``)."""
    from torchtitan.protocols.train_spec import get_train_spec

    from titan_integration.train import parse_job_config

    cfg = parse_job_config(["--job.config_file", TOML, "--model.name", name, "--model.flavor", flavor])
    spec = get_train_spec(name)
    args = spec.model_args[flavor]
    args.update_from_config(cfg)
    with torch.device("meta"):
        model = spec.model_cls(args)
    if not on_meta:
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
    return model
