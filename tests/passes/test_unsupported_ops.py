"""Graphs the I/W split cannot handle safely are refused with a clear error, never run wrong.

nn.GRU on CPU decomposes into in-place cells (``sigmoid_``/``add_``): split without a check
its grads came out wrong by up to 97%. nn.LSTM uses a fused kernel whose workspace the
fake-tensor trace cannot record.
"""
import pytest
import torch
from torch import nn

import dualpipe_fx
from passes.capture import TraceError


class _Recurrent(nn.Module):
    def __init__(self, cell) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(4, 4, batch_first=True)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out(h)


@pytest.mark.parametrize("cell,op", [(nn.GRU, "aten.gru"), (nn.LSTM, "aten.lstm"), (nn.RNN, "aten.rnn_tanh")])
def test_recurrent_layers_are_refused_naming_the_ops(cell, op):
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    try:
        split = dualpipe_fx.split(_Recurrent(cell), nn.functional.mse_loss, (x,), y, num_stages=1)
    except TraceError as err:
        assert op in str(err) and "Recurrent layers" in str(err)
        return
    # a recurrent kernel that traces without in-place ops must then be exact
    model = _Recurrent(cell)
    loss, grads = split.run((x,), y)
    ref = nn.functional.mse_loss(model(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)
