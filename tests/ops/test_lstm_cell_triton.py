"""The Triton LSTM / GRU gate kernels (triton_kernels/lstm.py) against the reference: the pointwise kernels alone, the
cells with gradients, and the layer ops (packed batch sizes, both directions) run by the reference's step loop with
the Triton kernels, forced to the triton backend.

Each test runs on the CPU under TRITON_INTERPRET=1 (set by conftest without a GPU), on tiny shapes, and on CUDA
tensors where there is a GPU (marked cuda)."""
import pytest
import torch

import mltoolkit
from mltoolkit import ops
from mltoolkit.ops.reference import lstm as ref
from mltoolkit.testing import Sample, assert_close, check_op, triton_forced


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def device(request):
    with triton_forced("lstm", request.param):
        yield request.param


def _kernels():
    from mltoolkit.triton_kernels import lstm

    return lstm


def _rnd(g, device, *shape):
    return torch.randn(*shape, generator=g).to(device)


@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 5), (2, 130)])
def test_pointwise_kernels_match_reference(device, rows, hidden):
    k = _kernels()
    g = torch.Generator().manual_seed(0)
    pre, c, bias = _rnd(g, device, rows, 4 * hidden), _rnd(g, device, rows, hidden), _rnd(g, device, 4 * hidden)
    for b in (None, bias):
        for a, e in zip(k.lstm_pointwise_forward(pre, c, b), ref.lstm_pointwise_forward(pre, c, b)):
            assert_close(a, e)
    h_new, c_new, gates = ref.lstm_pointwise_forward(pre, c)
    dh, dc = _rnd(g, device, rows, hidden), _rnd(g, device, rows, hidden)
    for d in (None, dc):
        for a, e in zip(k.lstm_pointwise_backward(dh, d, gates, c, c_new),
                        ref.lstm_pointwise_backward(dh, d, gates, c, c_new)):
            assert_close(a, e)
    x, gh, h = _rnd(g, device, rows, 3 * hidden), _rnd(g, device, rows, 3 * hidden), _rnd(g, device, rows, hidden)
    for a, e in zip(k.gru_pointwise_forward(x, gh, h), ref.gru_pointwise_forward(x, gh, h)):
        assert_close(a, e)
    saved = ref.gru_pointwise_forward(x, gh, h)[1]
    for a, e in zip(k.gru_pointwise_backward(dh, saved, h), ref.gru_pointwise_backward(dh, saved, h)):
        assert_close(a, e)


def test_cells_and_gradients(device):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: (_rnd(g, device, *s) * 0.5).requires_grad_(True)
    x, h, c = mk(3, 4), mk(3, 5), mk(3, 5)
    w_ih, w_hh, b_ih, b_hh = mk(20, 4), mk(20, 5), mk(20), mk(20)
    ours = lambda x, h, c, w_ih, w_hh, b_ih, b_hh: ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    oracle = lambda x, h, c, w_ih, w_hh, b_ih, b_hh: ref.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    check_op(ours, [Sample((x, h, c, w_ih, w_hh, b_ih, b_hh))], oracle, gradcheck=False, compile=False)
    gw_ih, gw_hh, gb_ih, gb_hh = mk(15, 4), mk(15, 5), mk(15), mk(15)
    check_op(ops.gru_cell, [Sample((x, h, gw_ih, gw_hh, gb_ih, gb_hh))], ref.gru_cell, gradcheck=False,
             compile=False)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_ops_match_reference_backend(device, kind, reverse):
    g = torch.Generator().manual_seed(2)
    hidden, batch = 3, 3
    gates = 4 if kind == "lstm" else 3
    bs = torch.tensor([3, 2, 2, 1])
    mk = lambda *s: (_rnd(g, device, *s) * 0.5).requires_grad_(True)
    x, w_ih = mk(8, 5), mk(gates * hidden, 5)  # the LSTM layer op projects x itself
    x_proj, h0, c0, w_hh, b_hh = mk(8, gates * hidden), mk(batch, hidden), mk(batch, hidden), \
        mk(gates * hidden, hidden), mk(gates * hidden)
    leaves = [x, w_ih, h0, c0, w_hh, b_hh] if kind == "lstm" else [x_proj, h0, w_hh, b_hh]

    def run():
        if kind == "lstm":
            outs = torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, b_hh, bs, reverse, True)[:3]
        else:
            outs = torch.ops.mltoolkit.gru_layer_fwd(x_proj, h0, w_hh, b_hh, bs, reverse, True)[:2]
        cots = [torch.ones_like(o) * (i + 1) for i, o in enumerate(outs)]
        return outs, torch.autograd.grad(outs, leaves, cots)

    outs, grads = run()
    with mltoolkit.backend("reference"):
        ref_outs, ref_grads = run()
    for a, e in zip((*outs, *grads), (*ref_outs, *ref_grads)):
        assert_close(a, e, atol=2e-5 * max(1.0, e.abs().max().item()))


def test_projected_cell_and_module_on_the_triton_backend(device):
    """The cell op with h (B, P), w_hh (4H, P) (an LSTM with projections), and an nn.LSTM(proj_size) through it."""
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: (_rnd(g, device, *s) * 0.5).requires_grad_(True)
    x_proj, h, c, w_hh = mk(3, 20), mk(3, 2), mk(3, 5), mk(20, 2)
    outs = torch.ops.mltoolkit.lstm_cell_fwd(x_proj, h, c, w_hh, None)[:2]
    grads = torch.autograd.grad(outs, [x_proj, h, c, w_hh], [torch.ones_like(o) for o in outs])
    with mltoolkit.backend("reference"):
        ref_outs = torch.ops.mltoolkit.lstm_cell_fwd(x_proj, h, c, w_hh, None)[:2]
        ref_grads = torch.autograd.grad(ref_outs, [x_proj, h, c, w_hh], [torch.ones_like(o) for o in ref_outs])
    for a, e in zip((*outs, *grads), (*ref_outs, *ref_grads)):
        assert_close(a, e, atol=2e-5 * max(1.0, e.abs().max().item()))
    theirs = torch.nn.LSTM(3, 4, bidirectional=True, proj_size=2).to(device)
    ours = mltoolkit.nn.LSTM.from_torch(theirs)
    x = torch.randn(3, 2, 3, device=device)
    with torch.no_grad():
        for a, e in zip((ours(x)[0], *ours(x)[1]), (theirs(x)[0], *theirs(x)[1])):
            assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_module_runs_on_the_triton_backend(device):
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).to(device)
    ours = mltoolkit.nn.LSTM.from_torch(theirs)
    x = torch.randn(4, 2, 3, device=device)
    with torch.no_grad():
        assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=1e-4)
