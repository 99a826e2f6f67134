"""mltoolkit.nn.LSTM / GRU against torch.nn.LSTM / GRU sharing the same parameters: outputs, final states and every
gradient over the option grid (layers, bidirectional, batch_first, bias, initial states, packed sequences with
unsorted lengths, unbatched input), state_dict interchange, dropout in train / eval, optimize() swapping, and bad
input errors that name the argument."""
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
    shape = (layers, theirs.hidden_size) if unbatched else (layers, batch, theirs.hidden_size)
    mk = lambda: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(True)
    return (mk(), mk()) if kind == "lstm" else mk()


def _flatten(out):
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        return [pad_packed_sequence(out)[0]]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out]


def _compare(theirs, ours, make_input, hx=None):
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
    assert len(their_outs) == len(our_outs)
    for a, b in zip(our_outs, their_outs):
        assert a.shape == b.shape
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(our_grads, their_grads):
        assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)


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
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(kind, batch_first):
    theirs, ours = _pair(kind, input_size=4, hidden_size=5, num_layers=2, bidirectional=True,
                         batch_first=batch_first)

    def make_input():
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        return x, [x]

    _compare(theirs, ours, make_input)
    _compare(theirs, ours, make_input, hx=_states(kind, theirs, 1, "cpu", torch.float32, unbatched=True))


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


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_between_layers_in_training_only(kind):
    theirs, ours = _pair(kind, input_size=3, hidden_size=8, num_layers=3, dropout=0.5)
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
    one_layer, _ = _pair(kind, input_size=3, hidden_size=8, num_layers=1)
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
    out = mltoolkit.optimize(model)
    assert type(out.lstm) is mnn.LSTM and type(out.gru) is mnn.GRU
    assert type(out.proj) is torch.nn.LSTM  # proj_size > 0 stays with torch
    for name, p in out.named_parameters():
        assert p is params[name]
    assert type(mltoolkit.optimize(torch.nn.GRU(2, 3))) is mnn.GRU


def test_proj_size_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="proj_size"):
        mnn.LSTM(3, 4, proj_size=2)


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
