"""The Triton attention kernels' block ranges (triton_kernels/attention.py `_band`) against the window rule, over
many (Lq, Lk, window, bottom_right, block size) combinations: every allowed (query, key) pair lies in exactly one
visited block, and the blocks visited without the mask (the `full` range) hold only allowed pairs inside the
sequence. `_band` itself runs (interpreted on the CPU, compiled on a GPU); the loops around it are emulated as the
kernels write them: the forward / dq kernels walk key blocks of each query block, the dk/dv kernel walks query
blocks of each key block with the window mirrored."""
import itertools

import pytest
import torch

from mltoolkit import _ext
from mltoolkit.backends import table
from mltoolkit.ops.reference import attention as ref

triton = pytest.importorskip("triton")
tl = triton.language
from mltoolkit.triton_kernels.attention import _band  # noqa: E402

LENGTHS = [0, 1, 15, 16, 17, 33, 64, 100]
WINDOWS = [-1, 0, 1, 3, 16, 17, 40, 150]
BLOCKS = [(16, 32), (32, 16), (64, 128), (128, 64)]
TILE = 1024


@triton.jit
def _band_probe(ARGS, OUT, N, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr):
    offs = tl.program_id(0) * T + tl.arange(0, T)
    ok = offs < N
    first = tl.load(ARGS + offs * 6 + 0, mask=ok, other=0)
    last = tl.load(ARGS + offs * 6 + 1, mask=ok, other=0)
    length = tl.load(ARGS + offs * 6 + 2, mask=ok, other=0)
    diag = tl.load(ARGS + offs * 6 + 3, mask=ok, other=0)
    w_lo = tl.load(ARGS + offs * 6 + 4, mask=ok, other=0)
    w_hi = tl.load(ARGS + offs * 6 + 5, mask=ok, other=0)
    lo, full_lo, full_hi, hi = _band(first, last, length, diag, w_lo, w_hi, HAS_LO, HAS_HI, BLOCK)
    tl.store(OUT + offs * 4 + 0, lo, mask=ok)
    tl.store(OUT + offs * 4 + 1, full_lo, mask=ok)
    tl.store(OUT + offs * 4 + 2, full_hi, mask=ok)
    tl.store(OUT + offs * 4 + 3, hi, mask=ok)


def _skip_unavailable(device):
    why = table("attention").get("triton").available()
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    if device == "cpu" and not _ext.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")


def _run_bands(requests, device):
    """requests: {(has_lo, has_hi, block): [(first, last, length, diag, w_lo, w_hi), ...]} -> same keys, lists of
    (lo, full_lo, full_hi, hi)."""
    results = {}
    for (has_lo, has_hi, block), rows in requests.items():
        args = torch.tensor(rows, dtype=torch.int32, device=device)
        out = torch.full((len(rows), 4), -7, dtype=torch.int32, device=device)
        n = len(rows)
        _band_probe[((n + TILE - 1) // TILE,)](args, out, n, HAS_LO=has_lo, HAS_HI=has_hi, BLOCK=block, T=TILE)
        results[(has_lo, has_hi, block)] = out.cpu().tolist()
    return results


def _normalized(w, lq, lk):
    # attention.py's _Problem: a window reaching past every row is no window.
    return -1 if w < 0 or w >= lq + lk else w


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_band_covers_window_exactly(device):
    _skip_unavailable(device)
    cases = []
    requests = {}
    for lq, lk, wl0, wr0, br, (bm, bn) in itertools.product(LENGTHS, LENGTHS, WINDOWS, WINDOWS, (False, True),
                                                            BLOCKS):
        if wl0 >= 0 and wr0 >= 0 and wl0 > 3 and wr0 > 3 and (wl0 + wr0) % 2:
            continue  # thin out the two-sided windows
        wl, wr = _normalized(wl0, lq, lk), _normalized(wr0, lq, lk)
        diag = lk - lq if br else 0
        fwd, kv = [], []
        for m0 in range(0, lq, bm):  # forward / dq: key blocks of each query block
            key = (wl >= 0, wr >= 0, bn)
            requests.setdefault(key, []).append((m0, min(m0 + bm, lq) - 1, lk, diag, wl, wr))
            fwd.append((m0, key, len(requests[key]) - 1))
        for n0 in range(0, lk, bn):  # dk/dv: query blocks of each key block, window mirrored
            key = (wr >= 0, wl >= 0, bm)
            requests.setdefault(key, []).append((n0, min(n0 + bn, lk) - 1, lq, -diag, wr, wl))
            kv.append((n0, key, len(requests[key]) - 1))
        cases.append((lq, lk, wl0, wr0, br, bm, bn, fwd, kv))
    bands = _run_bands(requests, device)

    failures = []
    for lq, lk, wl0, wr0, br, bm, bn, fwd, kv in cases:
        allowed = ref.window_allowed(lq, lk, wl0, wr0, br)
        for axis, blocks, own, other, own_len, other_len in (("fwd", fwd, bm, bn, lq, lk),
                                                              ("dkdv", kv, bn, bm, lk, lq)):
            # cover[own index, other index]: how often each pair is visited
            ok = allowed if axis == "fwd" else allowed.T
            cover = torch.zeros((own_len, other_len), dtype=torch.int32)
            for start, key, idx in blocks:
                lo, full_lo, full_hi, hi = bands[key][idx]
                a0, a1 = start, min(start + own, own_len)
                for s, e, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
                    for b0 in range(s, e, other):
                        why = None
                        if b0 % other or b0 < 0:
                            why = "unaligned block"
                        elif not masked and b0 + other > other_len:
                            why = "unmasked block past the end"
                        elif not masked and not bool(ok[a0:a1, b0:b0 + other].all()):
                            why = "unmasked block with masked pairs"
                        if why:
                            failures.append((axis, why, lq, lk, wl0, wr0, br, bm, bn, start, b0))
                        cover[a0:a1, b0:b0 + other] += 1
            if bool((cover > 1).any()):
                failures.append((axis, "pair visited twice", lq, lk, wl0, wr0, br, bm, bn))
            if bool((ok & (cover == 0)).any()):
                failures.append((axis, "allowed pair never visited", lq, lk, wl0, wr0, br, bm, bn))
    assert not failures, f"{len(failures)} failures, first: {failures[:5]}"
