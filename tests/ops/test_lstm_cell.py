"""The fused LSTM / GRU ops (mltoolkit/ops/lstm.py): cells against the written-out math and torch's cells (outputs
and every gradient, odd sizes, float32 and float64 gradcheck; the cell op's projected form, h (B, K) with
w_hh (4H, K), as an LSTM with projections calls it), layer ops (packed batch sizes, both directions)
against the reference backend's step loop, opcheck, torch.compile(fullgraph=True), and bad input.

The C++ backend is the one under test on CPU tensors; the CUDA-marked cases run the CUDA backend on a GPU."""
import pytest
import torch

import mltoolkit
from mltoolkit import ops
from mltoolkit.backends import table
from mltoolkit.ops.reference import lstm as ref
from mltoolkit.testing import Sample, assert_close, check_op


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def _cell_inputs(kind, batch, inp, hidden, device="cpu", dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = 4 if kind == "lstm" else 3
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    x, h = mk(batch, inp), mk(batch, hidden)
    c = mk(batch, hidden) if kind == "lstm" else None
    w_ih, w_hh = mk(gates * hidden, inp), mk(gates * hidden, hidden)
    b_ih, b_hh = (mk(gates * hidden), mk(gates * hidden)) if bias else (None, None)
    return x, h, c, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,inp,hidden", [(1, 1, 1), (7, 5, 3), (3, 17, 97), (2, 4, 123)])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_matches_math_and_torch(device, batch, inp, hidden, bias):
    x, h, c, w_ih, w_hh, b_ih, b_hh = _cell_inputs("lstm", batch, inp, hidden, device, bias=bias)
    ours = lambda x, h, c, w_ih, w_hh, b_ih=None, b_hh=None: ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    oracle = lambda x, h, c, w_ih, w_hh, b_ih=None, b_hh=None: ref.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    args = tuple(t for t in (x, h, c, w_ih, w_hh, b_ih, b_hh) if t is not None)
    small = batch * hidden <= 64
    check_op(ours, [Sample(args)], oracle, gradcheck=small, compile=small)
    want = torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    for got, exp in zip(ours(*args), want):
        assert_close(got, exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,inp,hidden", [(1, 1, 1), (7, 5, 3), (3, 17, 97), (2, 4, 123)])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_matches_math_and_torch(device, batch, inp, hidden, bias):
    x, h, _, w_ih, w_hh, b_ih, b_hh = _cell_inputs("gru", batch, inp, hidden, device, bias=bias)
    args = tuple(t for t in (x, h, w_ih, w_hh, b_ih, b_hh) if t is not None)
    small = batch * hidden <= 64
    check_op(ops.gru_cell, [Sample(args)], ref.gru_cell, gradcheck=small, compile=small)
    assert_close(ops.gru_cell(*args), torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh))


def _proj_cell_args(batch, hidden, width, device="cpu", dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    x_proj, h, c, w_hh = mk(batch, 4 * hidden), mk(batch, width), mk(batch, hidden), mk(4 * hidden, width)
    return x_proj, h, c, w_hh, (mk(4 * hidden) if bias else None)


def _proj_cell_oracle(x_proj, h, c, w_hh, b_hh=None):
    h_new, c_new, gates = ref.lstm_pointwise_forward(x_proj + h @ w_hh.t(), c, b_hh)
    return h_new, c_new, gates


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,hidden,width", [(1, 2, 1), (3, 7, 5), (2, 97, 17), (5, 4, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_op_with_projected_state_width(device, batch, hidden, width, bias):
    """lstm_cell_fwd with h (B, K), w_hh (4H, K), K != H (proj_size, or wider): outputs, gradients (gradcheck in
    float64), opcheck and compile; float32 against the same math."""
    args = _proj_cell_args(batch, hidden, width, device, bias=bias)
    args = tuple(a for a in args if a is not None)
    op = lambda *a: torch.ops.mltoolkit.lstm_cell_fwd(*a, *(() if bias else (None,)))[:2]
    small = batch * hidden <= 64
    check_op(op, [Sample(args)], lambda *a: _proj_cell_oracle(*a)[:2], gradcheck=small, compile=small)
    full = (*args, *(() if bias else (None,)))
    h_new, c_new, gates = torch.ops.mltoolkit.lstm_cell_fwd(*full)
    assert h_new.shape == (batch, hidden) and c_new.shape == (batch, hidden) and gates.shape == (batch, 4 * hidden)
    if small:
        torch.library.opcheck(torch.ops.mltoolkit.lstm_cell_fwd, full)
    f32 = tuple(a.detach().float() if a is not None else None for a in full)
    for a, b in zip(torch.ops.mltoolkit.lstm_cell_fwd(*f32), _proj_cell_oracle(*f32)):
        assert_close(a, b)


def test_lstm_cell_op_refuses_mismatched_projected_shapes():
    x_proj, h, c, w_hh, _ = (t.detach() if t is not None else None for t in _proj_cell_args(2, 4, 3))
    with pytest.raises(RuntimeError, match=r"lstm_cell_forward_cpu: h must have shape \(2, 3\)"):
        mltoolkit._ext._C.lstm_cell_forward_cpu(x_proj, torch.randn(2, 4, dtype=torch.float64), c, w_hh, None)
    with pytest.raises(RuntimeError, match=r"lstm_cell_forward_cpu: c must have shape \(2, 4\)"):
        mltoolkit._ext._C.lstm_cell_forward_cpu(x_proj, h, torch.randn(2, 3, dtype=torch.float64), w_hh, None)
    with pytest.raises(RuntimeError, match=r"lstm_cell_forward_cpu: w_hh must have shape \(4\*H, K\)"):
        mltoolkit._ext._C.lstm_cell_forward_cpu(x_proj, h, c, torch.randn(15, 3, dtype=torch.float64), None)
    # the layer ops take the plain LSTM only (an LSTM with projections runs the cell op per step)
    with pytest.raises(RuntimeError, match="lstm_layer_forward_cpu: w_hh must have shape"):
        mltoolkit._ext._C.lstm_layer_forward_cpu(x_proj, h, c, None, w_hh, None, None, False, False)


def test_cell_pointwise_backward_ops_match_reference():
    g = torch.Generator().manual_seed(3)
    B, H = 5, 33
    rnd = lambda *s: torch.randn(*s, generator=g)
    gates = torch.cat([rnd(B, H).sigmoid(), rnd(B, H).sigmoid(), rnd(B, H).tanh(), rnd(B, H).sigmoid()], 1)
    dh, dc, c, c_new = rnd(B, H), rnd(B, H), rnd(B, H), rnd(B, H)
    for dc_arg in (dc, None):
        got = torch.ops.mltoolkit.lstm_cell_bwd(dh, dc_arg, gates, c, c_new)
        want = ref.lstm_pointwise_backward(dh, dc_arg, gates, c, c_new)
        for a, b in zip(got, want):
            assert_close(a, b)
    saved = torch.cat([rnd(B, H).sigmoid(), rnd(B, H).sigmoid(), rnd(B, H).tanh(), rnd(B, H)], 1)
    h = rnd(B, H)
    for a, b in zip(torch.ops.mltoolkit.gru_cell_bwd(dh, saved, h), ref.gru_pointwise_backward(dh, saved, h)):
        assert_close(a, b)
    torch.library.opcheck(torch.ops.mltoolkit.lstm_cell_bwd, (dh, dc, gates, c, c_new))
    torch.library.opcheck(torch.ops.mltoolkit.gru_cell_bwd, (dh, saved, h))


# ---- layer ops --------------------------------------------------------------------------------------------------

# Layer kinds: "lstm" takes x_proj (+ a bias), "lstm-x" the layer input x with w_ih (the op projects it itself).
def _layer_inputs(kind, batch_sizes, batch, hidden, dtype=torch.float32, device="cpu", seed=0, inp=5):
    g = torch.Generator().manual_seed(seed)
    gates = 3 if kind == "gru" else 4
    rows = sum(batch_sizes) if batch_sizes is not None else 6 * batch
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    x = mk(rows, inp) if kind == "lstm-x" else mk(rows, gates * hidden)
    w_ih = mk(gates * hidden, inp) if kind == "lstm-x" else None
    h0, c0, w_hh, bias = mk(batch, hidden), mk(batch, hidden), mk(gates * hidden, hidden), mk(gates * hidden)
    bs = torch.tensor(batch_sizes, dtype=torch.int64) if batch_sizes is not None else None
    return x, h0, c0, w_ih, w_hh, bias, bs


def _call_layer(kind, x, h0, c0, w_ih, w_hh, bias, bs, reverse):
    if kind == "gru":
        return torch.ops.mltoolkit.gru_layer_fwd(x, h0, w_hh, bias, bs, reverse, True)[:2]
    return torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, bias, bs, reverse, True)[:3]


LAYER_CASES = {"uniform": (None, 3, 7), "packed": ([4, 4, 3, 1, 1], 4, 5), "packed-one": ([1, 1, 1], 1, 2),
               "packed-odd-h": ([5, 3, 2], 5, 97)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["lstm", "lstm-x", "gru"])
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_op_matches_reference_loop(device, kind, case, reverse):
    batch_sizes, batch, hidden = LAYER_CASES[case]
    inputs = _layer_inputs(kind, batch_sizes, batch, hidden, device=device)
    leaves = [t for t in inputs if t is not None and t.requires_grad and (kind != "gru" or t is not inputs[2])]
    outs = _call_layer(kind, *inputs, reverse)
    cots = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    with mltoolkit.backend("reference"):
        ref_outs = _call_layer(kind, *inputs, reverse)
        ref_grads = torch.autograd.grad(ref_outs, leaves, cots, allow_unused=True)
    for a, b in zip(outs, ref_outs):
        assert_close(a, b)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None
            continue
        assert_close(a, b, atol=2e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("kind", ["lstm", "lstm-x"])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer_op_large_enough_for_threads_matches_reference(kind, reverse):
    # B * H^2 large enough that the C++ kernel splits the hidden units over threads (barrier per step); H = 130 leaves
    # a partial panel, the packed batch sizes idle rows, 7 rows a partial register tile.
    x, h0, c0, w_ih, w_hh, bias, bs = (t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t
                                       for t in _layer_inputs(kind, [8, 8, 7, 3, 3, 1], 8, 130, inp=40,
                                                              dtype=torch.float64))
    w_hh = w_hh * 0.2
    got = torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, bias, bs, reverse, True)
    with mltoolkit.backend("reference"):
        want = torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, bias, bs, reverse, True)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "lstm-x", "gru"])
def test_layer_op_gradcheck_opcheck_and_compile(kind):
    x, h0, c0, w_ih, w_hh, bias, bs = _layer_inputs(kind, [3, 2, 2, 1], 3, 2, dtype=torch.float64)
    if kind == "gru":
        fn = lambda x, h, w, b: torch.ops.mltoolkit.gru_layer_fwd(x, h, w, b, bs, True, True)[:2]
        args = (x, h0, w_hh, bias)
        op, full = torch.ops.mltoolkit.gru_layer_fwd, lambda *a: (*a, bs)
    else:
        fn = lambda x, h, c, wi, w, b: torch.ops.mltoolkit.lstm_layer_fwd(x, h, c, wi, w, b, bs, True, True)[:3]
        args = (x, h0, c0, w_ih, w_hh, bias)
        op, full = torch.ops.mltoolkit.lstm_layer_fwd, lambda *a: (*a, bs)
    torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)
    torch.library.opcheck(op, (*full(*args), True, True))
    torch.library.opcheck(op, (*full(*(a.detach() if a is not None else None for a in args)), False, False))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(compiled(*args), fn(*args)):
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["lstm", "lstm-x"])
def test_save_false_forward_only_matches_and_refuses_backward(kind):
    x, h0, c0, w_ih, w_hh, bias, _ = _layer_inputs(kind, None, 2, 3)
    with torch.no_grad():
        out_saved = torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, bias, None, False, True)
        out_plain = torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, bias, None, False, False)
    for a, b in zip(out_saved[:3], out_plain[:3]):
        assert torch.equal(a, b)
    assert out_plain[3].numel() == 0 and out_plain[4].numel() == 0
    out = torch.ops.mltoolkit.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, bias, None, False, False)[0]
    with pytest.raises(RuntimeError, match="save=False"):
        out.sum().backward()


def test_cpp_backend_is_chosen_for_float32_cpu_and_reference_for_bfloat16():
    x = torch.randn(2, 8)
    assert table("lstm").select(x).name == "cpp"
    assert table("lstm").select(x.bfloat16()).name == "reference"
    out = ops.lstm_cell(x.bfloat16(), (torch.zeros(2, 2, dtype=torch.bfloat16),) * 2,
                        torch.randn(8, 8, dtype=torch.bfloat16), torch.randn(8, 2, dtype=torch.bfloat16))
    assert out[0].dtype == torch.bfloat16


def test_bad_input_names_the_argument():
    x, h, c, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in _cell_inputs("lstm", 2, 3, 4))
    with pytest.raises(ValueError, match="input.size"):
        ops.lstm_cell(torch.randn(2, 5), (h, c), w_ih, w_hh)
    with pytest.raises(ValueError, match="h must have shape"):
        ops.lstm_cell(x, (torch.randn(3, 4), c), w_ih, w_hh)
    with pytest.raises(TypeError, match="c must have input's dtype"):
        ops.lstm_cell(x, (h, c.double()), w_ih, w_hh)
    with pytest.raises(TypeError, match="input must be a Tensor"):
        ops.gru_cell([1.0], h, w_ih[:12], w_hh[:12])
    # the C++ kernels check their own arguments too
    layer = mltoolkit._ext._C.lstm_layer_forward_cpu
    h2, c2 = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="lstm_layer_forward_cpu: h0 must have shape"):
        layer(torch.randn(6, 16), torch.randn(2, 3), torch.randn(2, 3), None, torch.randn(16, 4), None, None, False,
              False)
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        layer(torch.randn(3, 16), h2, c2, None, torch.randn(16, 4), None, torch.tensor([1, 2]), False, False)
    with pytest.raises(RuntimeError, match=r"lstm_layer_forward_cpu: w_ih must have shape \(4\*H=16, I\)"):
        layer(torch.randn(6, 5), h2, c2, torch.randn(12, 5), torch.randn(16, 4), None, None, False, False)
    with pytest.raises(RuntimeError, match=r"lstm_layer_forward_cpu: x must have shape \(6, 5\)"):
        layer(torch.randn(6, 7), h2, c2, torch.randn(16, 5), torch.randn(16, 4), None, None, False, False)
    with pytest.raises(RuntimeError, match=r"lstm_layer_forward_cpu: bias must have shape \(16,\)"):
        layer(torch.randn(6, 5), h2, c2, torch.randn(16, 5), torch.randn(16, 4), torch.randn(12), None, False, False)
    with pytest.raises(RuntimeError, match="lstm_layer_forward_cpu: w_ih must have dtype"):
        layer(torch.randn(6, 5), h2, c2, torch.randn(16, 5).double(), torch.randn(16, 4), None, None, False, False)
    with pytest.raises(RuntimeError, match="w_hh must have dtype"):
        mltoolkit._ext._C.gru_cell_forward_cpu(torch.randn(2, 12), torch.randn(2, 4), torch.randn(12, 4).double(),
                                               None)


def test_onednn_mm_is_a_matmul():
    """_ext.onednn_mm (the layer backward's GEMMs): a @ b for float32 CPU matrices, transposed views included; other
    dtypes, empty sizes and autograd take a @ b itself (differentiable)."""
    from mltoolkit import _ext

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 65, generator=g), torch.randn(65, 19, generator=g)
    for x, y in ((a, b), (a.t().contiguous().t(), b), (torch.randn(65, 37, generator=g).t(), b.t().contiguous().t())):
        torch.testing.assert_close(_ext.onednn_mm(x, y), x.double().mm(y.double()).float(), rtol=1e-5, atol=1e-5)
    assert _ext.onednn_mm(a.double(), b.double()).dtype == torch.float64
    assert _ext.onednn_mm(a[:0], b).shape == (0, 19) and _ext.onednn_mm(a[:, :0], b[:0]).abs().sum() == 0
    leaf = a.clone().requires_grad_()
    _ext.onednn_mm(leaf, b).sum().backward()
    torch.testing.assert_close(leaf.grad, b.sum(1).expand(37, 65))


def test_gemm_tn_is_a_transposed_matmul():
    """_ext.gemm_tn (the layer backward's weight gradients): a^T b through the C++ kernel (blocked transposes into
    kept memory, then oneDNN) for float32 CPU matrices of any size, edges included; else a.t() @ b."""
    from mltoolkit import _ext

    g = torch.Generator().manual_seed(1)
    for k, m, n in ((300, 70, 33), (16, 16, 16), (1, 5, 3), (130, 1, 17)):
        a, b = torch.randn(k, m, generator=g), torch.randn(k, n, generator=g)
        torch.testing.assert_close(_ext.gemm_tn(a, b), (a.double().t() @ b.double()).float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(_ext.gemm_tn(a.t().contiguous().t(), b), _ext.gemm_tn(a, b))
    assert _ext.gemm_tn(a[:0], b[:0]).abs().sum() == 0 and _ext.gemm_tn(a[:, :0], b).shape == (0, n)
    assert _ext.gemm_tn(a.double(), b.double()).dtype == torch.float64
    if _ext._C is not None:
        with pytest.raises(RuntimeError, match="gemm_tn_cpu: a .K, M. and b .K, N. must be 2-D with one K"):
            _ext._C.gemm_tn_cpu(a, b[1:])
