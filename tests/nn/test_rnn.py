"""mltoolkit.nn.LSTM / GRU against torch.nn.LSTM / GRU sharing the same parameters: outputs, final states and every
gradient over the option grid (layers, bidirectional, batch_first, bias, initial states, packed sequences with
unsorted lengths, unbatched input), state_dict interchange, dropout in train / eval, optimize() swapping, and bad
input errors that name the argument. The LSTM with projections (proj_size > 0) goes over the same grid, in float32
and float64, plus torch.compile of the module and torch's refusals of a bad proj_size."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mltoolkit
from mltoolkit import nn as mnn
from mltoolkit.testing import assert_close


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CLASSES = {"lstm": (torch.nn.LSTM, mnn.LSTM), "gru": (torch.nn.GRU, mnn.GRU)}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def _pair(kind, device="cpu", dtype=torch.float32, **kwargs):
    torch_cls, our_cls = CLASSES[kind]
    theirs = torch_cls(**kwargs).to(device, dtype)
    ours = our_cls.from_torch(theirs)
    return theirs, ours


def _states(kind, theirs, batch, device, dtype, unbatched=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    layers = theirs.num_layers * (2 if theirs.bidirectional else 1)
    proj = getattr(theirs, "proj_size", 0)

    def mk(size):
        shape = (layers, size) if unbatched else (layers, batch, size)
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(True)

    return (mk(proj or theirs.hidden_size), mk(theirs.hidden_size)) if kind == "lstm" else mk(theirs.hidden_size)


def _flatten(out):
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        return [pad_packed_sequence(out)[0]]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out]


def _compare(theirs, ours, make_input, hx=None, tight=False):
    """Runs both modules on fresh copies of the input (and states) and compares outputs and all gradients."""
    results = []
    for module in (theirs, ours):
        module.zero_grad()
        inp, leaves = make_input()
        h = None
        if hx is not None:
            h = tuple(t.detach().clone().requires_grad_(True) for t in hx) if isinstance(hx, tuple) else \
                hx.detach().clone().requires_grad_(True)
            leaves = leaves + (list(h) if isinstance(h, tuple) else [h])
        outs = _flatten(module(inp, h))
        g = torch.Generator().manual_seed(5)
        cots = [torch.randn(o.shape, generator=g).to(o) for o in outs]
        torch.autograd.backward(outs, cots)
        grads = [t.grad.clone() for t in leaves] + [p.grad.clone() for p in module.parameters()]
        results.append((outs, grads))
    (their_outs, their_grads), (our_outs, our_grads) = results
    assert len(their_outs) == len(our_outs) and len(their_grads) == len(our_grads)
    atol, rtol = (1e-12, 1e-10) if tight else (1e-5, 1e-4)
    for a, b in zip(our_outs, their_outs):
        assert a.shape == b.shape
        assert_close(a, b, atol=atol, rtol=rtol)
    for a, b in zip(our_grads, their_grads):
        assert_close(a, b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol)


GRID = list(itertools.product([1, 2], [False, True], [False, True], [True, False]))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", GRID,
                         ids=[f"L{a}-{'bi' if b else 'uni'}-{'bf' if c else 'tf'}-{'bias' if d else 'nobias'}"
                              for a, b, c, d in GRID])
def test_matches_torch_over_the_option_grid(kind, layers, bidirectional, batch_first, bias):
    theirs, ours = _pair(kind, input_size=5, hidden_size=7, num_layers=layers, bidirectional=bidirectional,
                         batch_first=batch_first, bias=bias)
    shape = (3, 4, 5) if batch_first else (4, 3, 5)

    def make_input():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        return x, [x]

    _compare(theirs, ours, make_input)
    _compare(theirs, ours, make_input, hx=_states(kind, theirs, 3, "cpu", torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_with_unsorted_lengths(device, kind, bidirectional, batch_first):
    theirs, ours = _pair(kind, device, input_size=3, hidden_size=6, num_layers=2, bidirectional=bidirectional,
                         batch_first=batch_first)
    lengths = torch.tensor([2, 5, 1, 4, 5])

    def make_input():
        x = torch.randn(5, 5, 3, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_(True)
        return pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False), [x]

    _compare(theirs, ours, make_input)
    _compare(theirs, ours, make_input, hx=_states(kind, theirs, 5, device, torch.float32))
    # hidden states come back in the caller's order
    with torch.no_grad():
        packed = make_input()[0]
        h_ours, h_theirs = ours(packed)[1], theirs(packed)[1]
    for a, b in zip(_flatten(h_ours), _flatten(h_theirs)):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("threads", [2, 3])
def test_layer_split_across_threads(kind, threads):
    """The CPU layer kernels with a team of threads (the other tests run one): the LSTM forward and the LSTM / GRU
    backward's steps split the hidden units by column panels (an uneven split at 3 threads, a partial last panel at
    H = 160) and meet at one barrier a step; packed sequences of unsorted lengths make the active rows shrink from
    step to step."""
    torch.set_num_threads(threads)
    theirs, ours = _pair(kind, input_size=24, hidden_size=160, num_layers=2, bidirectional=True)
    lengths = torch.tensor([7, 3, 9, 1, 9, 5, 2, 8])

    def make_input():
        x = torch.randn(9, 8, 24, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        return pack_padded_sequence(x, lengths, enforce_sorted=False), [x]

    _compare(theirs, ours, make_input, hx=_states(kind, theirs, 8, "cpu", torch.float32))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(kind, batch_first):
    theirs, ours = _pair(kind, input_size=4, hidden_size=5, num_layers=2, bidirectional=True,
                         batch_first=batch_first)

    def make_input():
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        return x, [x]

    _compare(theirs, ours, make_input)
    _compare(theirs, ours, make_input, hx=_states(kind, theirs, 1, "cpu", torch.float32, unbatched=True))


def test_layer_with_large_saved_tensors():
    """A layer whose saved gates and gate gradient are 32 MiB or more (their memory comes from the reused-block pool
    on the CPU): outputs and every gradient as torch's, twice in a row (the second call reuses the first's blocks)."""
    theirs, ours = _pair("lstm", input_size=64, hidden_size=1024, num_layers=1)
    x = torch.randn(64, 32, 64)  # N = 2048 rows: (N, 4H) float32 = 33.5 MB
    for _ in range(2):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        out_t, _ = theirs(a)
        out_o, _ = ours(b)
        g = torch.randn_like(out_t)
        out_t.backward(g)
        out_o.backward(g)
        assert_close(out_o, out_t, name="output")
        assert_close(b.grad, a.grad, atol=1e-4, name="dx")
        for (name, p_t), (_, p_o) in zip(theirs.named_parameters(), ours.named_parameters()):
            assert_close(p_o.grad, p_t.grad, atol=1e-3 * max(1.0, p_t.grad.abs().max().item()), name=name)
            p_t.grad = p_o.grad = None


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float64_and_no_grad(kind):
    theirs, ours = _pair(kind, dtype=torch.float64, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _compare(theirs, ours, lambda: (lambda t: (t, [t]))(x.clone().requires_grad_(True)))
    with torch.no_grad():
        for a, b in zip(_flatten(ours(x)), _flatten(theirs(x))):
            assert_close(a, b)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_state_dict_is_interchangeable_with_torch(kind):
    torch_cls, our_cls = CLASSES[kind]
    kwargs = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    theirs, ours = torch_cls(**kwargs), our_cls(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        for a, b in zip(_flatten(ours(x)), _flatten(theirs(x))):
            assert_close(a, b, atol=1e-5, rtol=1e-4)
    theirs2 = torch_cls(**kwargs)
    theirs2.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for a, b in zip(_flatten(ours(x)), _flatten(theirs2(x))):
            assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,extra", [("lstm", {}), ("gru", {}), ("lstm", {"proj_size": 5})],
                         ids=["lstm", "gru", "lstm-proj"])
def test_dropout_between_layers_in_training_only(kind, extra):
    theirs, ours = _pair(kind, input_size=3, hidden_size=8, num_layers=3, dropout=0.5, **extra)
    x = torch.randn(6, 4, 3)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        eval_out = ours(x)[0]
        assert_close(eval_out, theirs(x)[0], atol=1e-5, rtol=1e-4)
        ours.train()
        torch.manual_seed(0)
        a = ours(x)[0]
        torch.manual_seed(0)
        b = ours(x)[0]
        c = ours(x)[0]
    assert torch.equal(a, b)  # the masks come from torch's generator
    assert not torch.allclose(a, eval_out) and not torch.allclose(a, c)
    one_layer, _ = _pair(kind, input_size=3, hidden_size=8, num_layers=1, **extra)
    with torch.no_grad():  # no dropout after the last layer: a 1-layer module is deterministic in training
        ours1 = CLASSES[kind][1].from_torch(one_layer).train()
        assert torch.equal(ours1(x)[0], ours1(x)[0])


def test_training_step_moves_like_torch():
    theirs, ours = _pair("lstm", input_size=4, hidden_size=6, num_layers=2, batch_first=True)
    twin = torch.nn.LSTM(4, 6, 2, batch_first=True)
    twin.load_state_dict(theirs.state_dict())
    x, target = torch.randn(3, 5, 4), torch.randn(3, 5, 6)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        for module, opt in ((ours, opt_ours), (twin, opt_twin)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(module(x)[0], target).backward()
            opt.step()
    for a, b in zip(ours.parameters(), twin.parameters()):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_optimize_swaps_lstm_and_gru_sharing_parameters():
    model = torch.nn.Sequential()
    model.add_module("lstm", torch.nn.LSTM(3, 4))
    model.add_module("gru", torch.nn.GRU(4, 4))
    model.add_module("proj", torch.nn.LSTM(3, 4, proj_size=2))
    params = {name: p for name, p in model.named_parameters()}
    twin = torch.nn.LSTM(3, 4, proj_size=2)
    twin.load_state_dict(model.proj.state_dict())
    out = mltoolkit.optimize(model)
    assert type(out.lstm) is mnn.LSTM and type(out.gru) is mnn.GRU
    assert type(out.proj) is mnn.LSTM and out.proj.proj_size == 2  # projections are swapped too
    for name, p in out.named_parameters():
        assert p is params[name]
    assert type(mltoolkit.optimize(torch.nn.GRU(2, 3))) is mnn.GRU
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        for a, b in zip(_flatten(out.proj(x)), _flatten(twin(x))):
            assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- LSTM with projections (proj_size > 0) ----------------------------------------------------------------------

@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", GRID,
                         ids=[f"L{a}-{'bi' if b else 'uni'}-{'bf' if c else 'tf'}-{'bias' if d else 'nobias'}"
                              for a, b, c, d in GRID])
def test_proj_matches_torch_over_the_option_grid(layers, bidirectional, batch_first, bias):
    theirs, ours = _pair("lstm", input_size=5, hidden_size=7, num_layers=layers, bidirectional=bidirectional,
                         batch_first=batch_first, bias=bias, proj_size=3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert any(k.startswith("weight_hr_l0") for k in ours.state_dict())
    shape = (3, 4, 5) if batch_first else (4, 3, 5)

    def make_input():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        return x, [x]

    _compare(theirs, ours, make_input)
    _compare(theirs, ours, make_input, hx=_states("lstm", theirs, 3, "cpu", torch.float32))
    out, (h_n, c_n) = ours(make_input()[0])
    dirs = 2 if bidirectional else 1
    assert out.shape[-1] == dirs * 3 and h_n.shape == (layers * dirs, 3, 3) and c_n.shape == (layers * dirs, 3, 7)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_proj_float64_tight_with_packed_and_padded_input(bidirectional, batch_first, bias):
    theirs, ours = _pair("lstm", dtype=torch.float64, input_size=3, hidden_size=6, num_layers=2,
                         bidirectional=bidirectional, batch_first=batch_first, bias=bias, proj_size=4)
    lengths = torch.tensor([2, 5, 1, 4, 5])

    def make_input(packed):
        x = torch.randn(5, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        if packed:
            return pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False), [x]
        return x, [x]

    for packed in (False, True):
        _compare(theirs, ours, lambda packed=packed: make_input(packed), tight=True)
        _compare(theirs, ours, lambda packed=packed: make_input(packed), tight=True,
                 hx=_states("lstm", theirs, 5, "cpu", torch.float64))


def test_proj_unbatched_input_and_state_dict_interchange():
    kwargs = dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)
    theirs, ours = torch.nn.LSTM(**kwargs), mnn.LSTM(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.weight_hr_l1_reverse.shape == (2, 5) and ours.weight_hh_l0.shape == (20, 2)

    def make_input():
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        return x, [x]

    _compare(theirs, ours, make_input)
    _compare(theirs, ours, make_input, hx=_states("lstm", theirs, 1, "cpu", torch.float32, unbatched=True))


def test_proj_compile_fullgraph_of_the_module():
    _, ours = _pair("lstm", input_size=3, hidden_size=6, num_layers=2, bidirectional=True, proj_size=4,
                    batch_first=True)
    x = torch.randn(2, 3, 3, requires_grad=True)  # 3 steps: Dynamo unrolls the step loop
    h0, c0 = torch.randn(4, 2, 4), torch.randn(4, 2, 6)
    eager = ours(x, (h0, c0))
    # aot_eager: Dynamo captures the whole module (unrolled steps) and AOTAutograd traces it through the cell op's fake
    # kernel and autograd formula; Inductor's C++ code generation for this many small kernels alone took ~15 s here
    # (the cell op itself goes through Inductor in tests/ops/test_lstm_cell.py)
    with torch._dynamo.config.patch(allow_rnn=True):
        torch._dynamo.reset()
        compiled = torch.compile(lambda t, h, c: ours(t, (h, c)), fullgraph=True, backend="aot_eager")(x, h0, c0)
    for a, b in zip(_flatten(compiled), _flatten(eager)):
        assert_close(a, b)
    grads = torch.autograd.grad(compiled[0].sum() + compiled[1][1].sum(), [x, ours.weight_hr_l1])
    want = torch.autograd.grad(eager[0].sum() + eager[1][1].sum(), [x, ours.weight_hr_l1])
    for a, b in zip(grads, want):
        assert_close(a, b)


def test_bad_proj_size_is_refused_by_name():
    for bad in (-1, 4, 5):
        with pytest.raises(ValueError, match="proj_size"):
            mnn.LSTM(3, 4, proj_size=bad)
    _, ours = _pair("lstm", input_size=3, hidden_size=4, num_layers=2, proj_size=2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"h0 must have shape .*proj_size\) = \[2, 2, 2\], got \[2, 2, 4\]"):
        ours(x, (torch.randn(2, 2, 4), torch.randn(2, 2, 4)))
    with pytest.raises(ValueError, match=r"c0 must have shape .*hidden_size\) = \[2, 2, 4\], got \[2, 2, 2\]"):
        ours(x, (torch.randn(2, 2, 2), torch.randn(2, 2, 2)))
    params = list(ours._flat_weights)
    params[4] = torch.randn(2, 3)  # w_hr of layer 0 must be (proj_size, hidden_size)
    with pytest.raises(ValueError, match="w_hr must have shape"):
        mltoolkit.ops.lstm_sequence(x, (torch.zeros(2, 2, 2), torch.zeros(2, 2, 4)), params, True, 2, 0.0, False,
                                    False)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bad_input_names_the_argument(kind):
    _, ours = _pair(kind, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="input_size. Expected 3, got 7"):
        ours(torch.randn(5, 2, 7))
    with pytest.raises(RuntimeError, match="input_size"):  # also a RuntimeError, as torch raises
        ours(torch.randn(5, 2, 7))
    bad_h = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"h0 must have shape .* \[2, 2, 4\], got \[2, 3, 4\]"):
        ours(x, (bad_h, torch.randn(2, 2, 4)) if kind == "lstm" else bad_h)
    if kind == "lstm":
        with pytest.raises(ValueError, match="c0 must have shape"):
            ours(x, (torch.randn(2, 2, 4), torch.randn(1, 2, 4)))
    with pytest.raises(TypeError, match="input must have the parameters' dtype torch.float32, got torch.float64"):
        ours(x.double())
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        ours(torch.randn(1, 5, 2, 3))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        ours([1.0, 2.0])


def test_compile_fullgraph():
    _, ours = _pair("lstm", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, requires_grad=True)
    params = list(ours._flat_weights)
    fn = lambda t: mltoolkit.ops.lstm_sequence(t, (torch.zeros(4, 2, 4),) * 2, params, True, 2, 0.0, False, True)[0]
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(x)
    assert_close(out, ours(x)[0])
    out.sum().backward()
    assert x.grad is not None
    # Dynamo refuses every torch.nn.RNNBase subclass unless allow_rnn is set; with it, the module compiles whole.
    with torch._dynamo.config.patch(allow_rnn=True):
        torch._dynamo.reset()
        assert_close(torch.compile(lambda t: ours(t)[0], fullgraph=True)(x), ours(x)[0])
