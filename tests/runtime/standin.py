"""A throwaway StageGraphs builder from nn.Module slices (autograd inside), until passes land."""
from __future__ import annotations

import torch
from torch.func import functional_call

from passes.stage_graphs import StageGraphs


def _part(model, loss_fn, k, lo, hi, last):
    layers = list(model.layers)[lo:hi]
    names = tuple(f"layers.{i}.{n}" for i in range(lo, hi) for n, _ in model.layers[i].named_parameters())
    mods = [(i, model.layers[i]) for i in range(lo, hi)]

    def forward(params, inputs):
        with torch.enable_grad():
            ps = [p.detach().requires_grad_() for p in params]
            x = inputs[0].detach().requires_grad_(k > 0)
            h, j = x, 0
            for i, m in mods:
                n = len(list(m.parameters()))
                local = dict(zip([nm for nm, _ in m.named_parameters()], ps[j:j + n]))
                h, j = functional_call(m, local, (h,)), j + n
            outs = (loss_fn(h, inputs[1]), h) if last else (h,)
        saved = (outs[0], x, *ps)
        return tuple(o.detach() for o in outs), saved

    def backward_input(saved, grad_outputs):
        out, x, *ps = saved
        gx = (torch.autograd.grad(out, x, grad_outputs[0], retain_graph=True)[0],) if k > 0 else ()
        return gx, (out, grad_outputs[0], *ps)

    def backward_weight(saved_w):
        out, g, *ps = saved_w
        return torch.autograd.grad(out, ps, g)

    ext = (("input:0",) if k == 0 else ()) + (("target",) if last else ())
    return StageGraphs(k, names, (), ("h",) * (k > 0) + ext, ext, ("loss", "out") if last else ("h",),
                       forward, backward_input, backward_weight, is_last=last)


def standin_parts(model, loss_fn, num_parts):
    depth = len(model.layers)
    bounds = [round(i * depth / num_parts) for i in range(num_parts + 1)]
    return [_part(model, loss_fn, k, bounds[k], bounds[k + 1], k == num_parts - 1) for k in range(num_parts)]
