"""mltoolkit.nn.MultiheadAttention, optimize() on transformer layers, and patch_torch(): same outputs, gradients
and state_dict as torch's modules and functions, on the fused path and on the fallbacks."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mltoolkit
import mltoolkit.patch
from mltoolkit.nn import MultiheadAttention
from mltoolkit.ops import attention as attention_ops
from mltoolkit.ops.reference import attention as reference
from mltoolkit.testing import assert_close, assert_close_flash

E, H, B, L, S = 16, 4, 3, 5, 7
F64 = torch.float64
TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The calls that reach mltoolkit.ops.scaled_dot_product_attention (the fused path), with their arguments."""
    calls = []
    real = attention_ops.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture
def unpatched():
    """Leaves torch.nn.functional as the test found it, whatever the test did."""
    assert F.scaled_dot_product_attention is TORCH_SDPA
    yield
    mltoolkit.unpatch_torch()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def make_pair(**kwargs):
    """torch's module with random parameters (biases too: torch zeroes them) and ours with the same values."""
    ref = torch.nn.MultiheadAttention(E, H, dtype=F64, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.4)
    ours = MultiheadAttention(E, H, dtype=F64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(module, inputs, kwargs, cotangent=None):
    """Output (and attention weights) of one call, plus gradients of the inputs and parameters for `cotangent`."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if len(set(map(id, inputs))) < len(inputs):  # keep `query is key is value` for the self-attention path
        leaves = [leaves[0]] * len(inputs)
    out, weights = module(*leaves, **kwargs)
    if cotangent is None:
        return out, weights, None
    module.zero_grad()
    grads = torch.autograd.grad(out, [*dict.fromkeys(leaves), *module.parameters()], cotangent)
    return out, weights, grads


def assert_same_as_torch(ref, ours, inputs, **kwargs):
    cot = torch.randn_like(run(ref, inputs, kwargs)[0])
    out_ref, w_ref, g_ref = run(ref, inputs, kwargs, cot)
    out, w, g = run(ours, inputs, kwargs, cot)
    assert_close(out, out_ref)
    assert out.stride() == out_ref.stride()
    assert (w is None) == (w_ref is None)
    if w is not None:
        assert_close(w, w_ref, name="attention weights")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, name=f"gradient {i}")


def rand(*shape):
    return torch.randn(*shape, dtype=F64)


def inputs_for(ref, cross):
    """query, key, value in the module's layout; self-attention passes one tensor three times."""
    seq = lambda n, e: rand(B, n, e) if ref.batch_first else rand(n, B, e)
    if not cross:
        x = seq(L, E)
        return x, x, x
    return seq(L, E), seq(S, ref.kdim), seq(S, ref.vdim)


def padding(src_len, float_mask=False):
    """(B, src_len) key-padding mask (True = ignore), right-padded, every row keeps at least 2 keys."""
    kpm = torch.zeros(B, src_len, dtype=torch.bool)
    kpm[1, -2:] = True
    kpm[2, 2:] = True
    return torch.zeros(B, src_len, dtype=F64).masked_fill(kpm, float("-inf")) if float_mask else kpm


def attention_mask(kind, src_len):
    if kind == "bool2d":  # True = not allowed; column 0 stays allowed so no row is empty
        m = torch.rand(L, src_len) < 0.3
    elif kind == "bool3d":
        m = torch.rand(B * H, L, src_len) < 0.3
    elif kind == "float2d":
        return rand(L, src_len)
    elif kind == "float3d":
        return rand(B * H, L, src_len)
    else:  # causal (top-left), as nn.Transformer.generate_square_subsequent_mask for square shapes
        return torch.triu(torch.ones(L, src_len, dtype=torch.bool), 1)
    m[..., 0] = False
    return m


MODULES = {
    "batch_first": dict(batch_first=True),
    "seq_first_no_bias": dict(batch_first=False, bias=False),
    "kdim_vdim": dict(batch_first=True, kdim=6, vdim=10),
    "kdim_vdim_seq_first_no_bias": dict(kdim=6, vdim=10, bias=False),
}
MASKS = ["none", "kpm_bool", "kpm_float", "bool2d", "bool3d", "float2d", "float3d", "both_bool", "both_float",
         "causal", "causal_kpm"]


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("config", list(MODULES))
def test_fused_path_matches_torch(config, masks, sdpa_calls):
    ref, ours = make_pair(**MODULES[config])
    cross = ref.kdim != E or masks.startswith("both")  # exercise cross-attention (S != L) too
    q, k, v = inputs_for(ref, cross)
    src_len = S if cross else L
    kw = dict(need_weights=False)
    if masks.startswith("kpm") or masks.startswith("both") or masks == "causal_kpm":
        kw["key_padding_mask"] = padding(src_len, float_mask=masks.endswith("float"))
    if masks in ("bool2d", "bool3d", "float2d", "float3d"):
        kw["attn_mask"] = attention_mask(masks, src_len)
    if masks.startswith("both"):
        kw["attn_mask"] = attention_mask("bool3d" if masks == "both_bool" else "float2d", src_len)
    if masks.startswith("causal"):
        kw["attn_mask"] = attention_mask("causal", src_len)
        kw["is_causal"] = True
    assert_same_as_torch(ref, ours, (q, k, v), **kw)

    assert len(sdpa_calls) == 1  # our one forward took the fused path
    _, op_kw = sdpa_calls[-1]
    mask = op_kw["attn_mask"]
    if masks.startswith("kpm"):
        assert mask.shape == (B, 1, 1, src_len)  # the cheap key-padding path, not (B, H, L, S)
    if masks == "causal":  # torch's rule: the hint replaces the mask
        assert mask is None and op_kw["is_causal"]
    if masks == "causal_kpm":
        assert mask.shape == (B, 1, L, src_len) and not op_kw["is_causal"]


@pytest.mark.parametrize("masks", ["none", "kpm", "attn3d"])
def test_unbatched_input(masks, sdpa_calls):
    ref, ours = make_pair(batch_first=True)
    x = rand(L, E)
    kw = dict(need_weights=False)
    if masks == "kpm":
        kw["key_padding_mask"] = padding(L)[1]
    if masks == "attn3d":
        kw["attn_mask"] = attention_mask("float3d", L)[:H]
    assert_same_as_torch(ref, ours, (x, x, x), **kw)
    assert len(sdpa_calls) == 1


def test_learnable_float_mask_and_fully_padded_sequence(sdpa_calls):
    ref, ours = make_pair(batch_first=True)
    x = rand(B, L, E)
    kpm = padding(L, float_mask=True)
    kpm[0] = float("-inf")  # sequence 0 is all padding: torch gives 0 attention output there, and so do we
    bias = rand(B * H, L, L).requires_grad_()
    outs = [m(x, x, x, key_padding_mask=kpm, attn_mask=bias, need_weights=False)[0] for m in (ref, ours)]
    cot = torch.randn_like(outs[0])
    (g_ref,), (g,) = (torch.autograd.grad(o, bias, cot) for o in outs)
    assert_close(outs[1], outs[0])
    assert_close(g, g_ref, name="gradient of attn_mask")
    assert len(sdpa_calls) == 1


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_runs_torch_forward(average, sdpa_calls):
    ref, ours = make_pair(batch_first=True)
    q, k, v = inputs_for(ref, cross=True)
    assert_same_as_torch(ref, ours, (q, k, v), key_padding_mask=padding(S), attn_mask=attention_mask("bool2d", S),
                         need_weights=True, average_attn_weights=average)
    assert not sdpa_calls


@pytest.mark.parametrize("extra", [dict(add_bias_kv=True), dict(add_zero_attn=True)])
def test_bias_kv_and_zero_attn_run_torch_forward(extra, sdpa_calls):
    ref, ours = make_pair(**extra)
    q, k, v = inputs_for(ref, cross=False)
    assert_same_as_torch(ref, ours, (q, k, v), key_padding_mask=padding(L), need_weights=False)
    assert not sdpa_calls


def test_dropout_in_training_replays_exactly(monkeypatch):
    """Train-mode dropout draws mltoolkit's Philox mask from a seed taken from torch's generator: replay that mask
    inside torch's own MHA (its SDPA call swapped for the reference with the mask) and compare exactly."""
    p = 0.3
    ref, ours = make_pair(batch_first=True, dropout=p)
    q, k, v = inputs_for(ref, cross=True)
    kw = dict(key_padding_mask=padding(S), need_weights=False)
    cot = rand(B, L, E)
    torch.manual_seed(7)
    out, _, grads = run(ours, (q, k, v), kw, cot)
    torch.manual_seed(7)
    again, _, _ = run(ours, (q, k, v), kw, cot)
    assert torch.equal(out, again)  # reproducible under torch.manual_seed

    torch.manual_seed(7)
    keep = reference.dropout_keep(int(attention_ops.draw_seed()), p, H, L, S, batch=B)

    def replay(q, k, v, attn_mask, dropout_p, is_causal):
        assert dropout_p == p and not is_causal
        return reference.attention(q, k, v, attn_mask, None, dropout_keep_mask=keep, dropout_p=dropout_p)[0]

    monkeypatch.setattr(F, "scaled_dot_product_attention", replay)
    out_ref, _, grads_ref = run(ref, (q, k, v), kw, cot)
    assert_close(out, out_ref)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert_close(a, b, name=f"gradient {i}")
    monkeypatch.undo()

    ours.eval()  # no dropout in eval: torch's output exactly
    ref.eval()
    assert_close(ours(q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0])
    assert not torch.allclose(out, ours(q, k, v, need_weights=False)[0])


@pytest.mark.parametrize("kwargs", [dict(), dict(kdim=6, vdim=10, bias=False)])
def test_state_dict_round_trip(kwargs):
    ref, ours = make_pair(**kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    back = torch.nn.MultiheadAttention(E, H, dtype=F64, **kwargs)
    back.load_state_dict(ours.state_dict())
    q, k, v = inputs_for(ref, cross=True)
    assert_close(back(q, k, v, need_weights=False)[0], ours(q, k, v, need_weights=False)[0])


def test_from_torch_and_optimize_share_parameters():
    ref = torch.nn.MultiheadAttention(E, H)
    ours = MultiheadAttention.from_torch(ref)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.in_proj_weight is ref.in_proj_weight and ours.out_proj.weight is ref.out_proj.weight
    model = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(E, H, kdim=6)})
    w = model["attn"].k_proj_weight
    assert mltoolkit.optimize(model) is model
    assert type(model["attn"]) is MultiheadAttention and model["attn"].k_proj_weight is w
    assert type(mltoolkit.optimize(torch.nn.MultiheadAttention(E, H))) is MultiheadAttention


def encoder(num_layers=2):
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=F64)
    return torch.nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)


@pytest.mark.parametrize("masks", ["none", "kpm", "causal", "causal_kpm"])
def test_optimize_transformer_encoder_trains_like_torch(masks, sdpa_calls):
    eager = encoder()
    fused = mltoolkit.optimize(copy.deepcopy(eager))
    assert all(type(layer.self_attn) is MultiheadAttention for layer in fused.layers)
    x = rand(B, L, E)
    kw = {}
    if masks.endswith("kpm"):
        kw["src_key_padding_mask"] = padding(L, float_mask=masks == "causal_kpm")  # same type as the float mask
    if masks.startswith("causal"):
        kw["mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
        kw["is_causal"] = True
    cot = rand(B, L, E)
    results = []
    for model in (eager, fused):
        leaf = x.clone().requires_grad_()
        out = model(leaf, **kw)
        results.append((out, torch.autograd.grad(out, [leaf, *model.parameters()], cot)))
    (out_ref, g_ref), (out, g) = results
    assert_close(out, out_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, name=f"gradient {i}")
    assert len(sdpa_calls) == 2  # training: our forward ran in both layers


def test_optimized_encoder_in_eval_mode_matches():
    """In eval without autograd torch's encoder fast path may read self_attn's weights directly: still correct."""
    eager = encoder().eval()
    fused = mltoolkit.optimize(copy.deepcopy(eager))
    x = rand(B, L, E)
    with torch.no_grad():
        assert_close(fused(x, src_key_padding_mask=padding(L)), eager(x, src_key_padding_mask=padding(L)))


def test_autocast_matches_torch(sdpa_calls):
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = MultiheadAttention.from_torch(copy.deepcopy(ref))
    x = torch.randn(B, L, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x, x, x, key_padding_mask=padding(L), need_weights=False)[0]
        out = ours(x, x, x, key_padding_mask=padding(L), need_weights=False)[0]
    assert len(sdpa_calls) == 1 and out.dtype == expected.dtype == torch.bfloat16
    assert_close_flash(out, ref(x, x, x, key_padding_mask=padding(L), need_weights=False)[0], expected)


@pytest.mark.slow
def test_compiles_fullgraph(unpatched):
    ref, ours = make_pair(batch_first=True)
    x = rand(B, L, E)
    compiled = torch.compile(ours, fullgraph=True)
    assert_close(compiled(x, x, x, key_padding_mask=padding(L), need_weights=False)[0],
                 ref(x, x, x, key_padding_mask=padding(L), need_weights=False)[0])
    q, k, v = qkv(2, 3, 5)
    with mltoolkit.patched_torch():
        out = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                            fullgraph=True)(q, k, v)
    assert_close(out, TORCH_SDPA(q, k, v, is_causal=True))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_flash_rule(dtype):
    """On the GPU kernels: ours in `dtype` is as close to torch's fp32 result as torch's own `dtype` result is."""
    ref32 = torch.nn.MultiheadAttention(128, 2, batch_first=True, device="cuda")
    ref = copy.deepcopy(ref32).to(dtype)
    ours = MultiheadAttention.from_torch(copy.deepcopy(ref))
    x = torch.randn(4, 97, 128, device="cuda")
    kpm = torch.zeros(4, 97, dtype=torch.bool, device="cuda")
    kpm[1, 50:] = True
    cot = torch.randn(4, 97, 128, device="cuda")
    results = []
    for module, t in ((ref32, x), (ref, x.to(dtype)), (ours, x.to(dtype))):
        leaf = t.clone().requires_grad_()
        out = module(leaf, leaf, leaf, key_padding_mask=kpm, need_weights=False)[0]
        results.append((out, torch.autograd.grad(out, leaf, cot.to(dtype=out.dtype))[0]))
    (out32, g32), (out_torch, g_torch), (out, g) = results
    assert_close_flash(out, out32, out_torch)
    assert_close_flash(g, g32, g_torch, name="gradient of the input")


def test_fused_path_bad_input():
    _, ours = make_pair(batch_first=True)
    q, k, v = rand(B, L, E), rand(B, S, E), rand(B, S, E)
    call = lambda *a, **kw: ours(*a, need_weights=False, **kw)
    with pytest.raises(ValueError, match="query must be 2-D"):
        call(q[None], k[None], v[None])
    with pytest.raises(ValueError, match="key and value must have query's 3 dims"):
        call(q, k[0], v)
    with pytest.raises(ValueError, match="query has 8 features but embed_dim is 16"):
        call(q[..., :8], k, v)
    with pytest.raises(ValueError, match="value has 8 features but vdim is 16"):
        call(q, k, v[..., :8])
    with pytest.raises(ValueError, match="key .* and value .* must agree"):
        call(q, k, v[:, :3])
    with pytest.raises(ValueError, match="query has batch size 3 but key has 2"):
        call(q, k[:2], v[:2])
    with pytest.raises(TypeError, match="query has dtype torch.float32 but the module's parameters are"):
        call(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \[3, 5\], expected \[3, 7\]"):
        call(q, k, v, key_padding_mask=padding(L))
    with pytest.raises(ValueError, match=r"attn_mask has shape \[7, 5\], expected \[5, 7\] or \[12, 5, 7\]"):
        call(q, k, v, attn_mask=torch.zeros(S, L))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating point, got torch.int64"):
        call(q, k, v, attn_mask=torch.zeros(L, S, dtype=torch.long))
    with pytest.raises(TypeError, match="key_padding_mask must be a Tensor or None"):
        call(q, k, v, key_padding_mask=[[True] * S] * B)
    with pytest.raises(RuntimeError, match="is_causal=True .* needs attn_mask"):
        call(q, k, v, is_causal=True)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask is deprecated"):
        call(q, k, v, key_padding_mask=padding(S), attn_mask=rand(L, S))


# ---- patch_torch --------------------------------------------------------------------------------------------

def qkv(*shape, d=8, dtype=F64):
    return tuple(torch.randn(*shape, d, dtype=dtype) for _ in range(3))


def test_patch_routes_sdpa_and_unpatch_restores_the_original(unpatched, sdpa_calls):
    q, k, v = qkv(2, 3, 5)
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    expected = TORCH_SDPA(q, k, v, attn_mask=mask)
    mltoolkit.patch_torch()
    mltoolkit.patch_torch()  # idempotent
    assert F.scaled_dot_product_attention is mltoolkit.patch.scaled_dot_product_attention
    assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)
    assert_close(F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.5),
                 TORCH_SDPA(q, k, v, None, 0.0, True, scale=0.5))
    assert len(sdpa_calls) == 2
    mltoolkit.unpatch_torch()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    mltoolkit.unpatch_torch()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_patch_routes_torch_own_multihead_attention(unpatched, sdpa_calls):
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    x = rand(B, L, E)
    expected = ref(x, x, x, key_padding_mask=padding(L), need_weights=False)[0]
    with mltoolkit.patched_torch():
        out = ref(x, x, x, key_padding_mask=padding(L), need_weights=False)[0]
    assert len(sdpa_calls) == 1  # F.multi_head_attention_forward looked the patched function up
    assert_close(out, expected)
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_patched_torch_context_nests(unpatched):
    mltoolkit.patch_torch()
    with mltoolkit.patched_torch():
        assert F.scaled_dot_product_attention is mltoolkit.patch.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is mltoolkit.patch.scaled_dot_product_attention  # still the outer patch
    with pytest.raises(KeyError):
        with mltoolkit.patched_torch():
            raise KeyError
    mltoolkit.unpatch_torch()
    with pytest.raises(KeyError):
        with mltoolkit.patched_torch():
            raise KeyError
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.parametrize("case", ["head_dim_512", "broadcast_batch", "two_dims", "nested"])
def test_patched_falls_back_to_torch_where_ours_rejects(case, unpatched, sdpa_calls):
    if case == "head_dim_512":
        q, k, v = qkv(1, 2, 3, d=512)
    elif case == "broadcast_batch":
        q, k, v = qkv(2, 2, 3)
        k, v = k[:1], v[:1]
    elif case == "two_dims":
        q, k, v = qkv(3)
    else:
        q, k, v = (torch.nested.nested_tensor([torch.randn(2, n, 8) for n in (3, 4)], layout=torch.jagged)
                   .transpose(1, 2) for _ in range(3))
    expected = TORCH_SDPA(q, k, v)
    with mltoolkit.patched_torch():
        out = F.scaled_dot_product_attention(q, k, v)
    if case == "nested":
        # torch's jagged SDPA calls F.scaled_dot_product_attention again on dense tensors: those may be ours.
        assert not any(t.is_nested for args, _ in sdpa_calls for t in args)
        out, expected = out.values(), expected.values()
    else:
        assert not sdpa_calls
    assert_close(out, expected)


def test_patched_follows_autocast(unpatched, sdpa_calls):
    q, k, v = qkv(2, 2, 5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = TORCH_SDPA(q, k, v)
        with mltoolkit.patched_torch():
            out = F.scaled_dot_product_attention(q, k, v)
    assert len(sdpa_calls) == 1 and out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, TORCH_SDPA(q, k, v), dtype=torch.bfloat16)


def test_patched_torch_errors_are_torchs(unpatched):
    q, k, v = qkv(2, 2, 5)
    with mltoolkit.patched_torch():
        with pytest.raises(RuntimeError, match="Expected query, key, and value to have the same dtype"):
            F.scaled_dot_product_attention(q, k.float(), v)
