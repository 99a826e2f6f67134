"""LR schedules against their formulas at every step, resume from state_dict, param groups, factory errors."""
import math
import warnings

import pytest
import torch

from mltoolkit.optim.lr_scheduler import SCHEDULERS, WarmupCosineLR, WarmupDecayLR, WarmupLR, get_scheduler

BASES = (0.1, 0.03)  # two param groups with different base lrs


def _opt(bases=BASES, cls=torch.optim.SGD, **kw):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in bases]
    return cls(groups, **kw)


def _formula(decay, t, base, W, T, floor=0.0, power=1.0, start=0.0, tau=None):
    """Independent, straightforward implementation of the documented formulas."""
    if t < W:
        return base * (start + (1 - start) * t / W)
    if decay == "constant":
        return base
    if decay == "inverse_sqrt":
        tau = tau if tau is not None else max(W, 1)
        return max(floor, base * math.sqrt(tau / (t - W + tau)))
    p = min(1.0, (t - W) / max(1, T - W))
    if decay == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * p))
    elif decay == "linear":
        shape = 1 - p
    else:
        shape = (1 - p) ** power
    return floor + (base - floor) * shape


def _run(sched, opt, steps):
    """lrs seen by the optimizer at steps 0..steps-1 (the lr used by optimizer.step() at that step)."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        assert sched.get_last_lr() == seen[-1]
        opt.step()
        sched.step()
    return seen


CASES = [
    ("cosine", dict()),
    ("cosine", dict(min_lr_ratio=0.1)),
    ("linear", dict()),
    ("linear", dict(min_lr=[0.01, 0.001])),
    ("polynomial", dict(power=2.0, min_lr_ratio=0.05)),
    ("polynomial", dict(power=0.5)),
    ("inverse_sqrt", dict()),
    ("inverse_sqrt", dict(timescale=3.0, min_lr_ratio=0.2)),
    ("constant", dict()),
    ("cosine", dict(start_factor=0.25)),
]


@pytest.mark.parametrize("decay,kw", CASES)
@pytest.mark.parametrize("W,T", [(5, 20), (0, 13), (7, 7), (1, 2)])
def test_formula_every_step(decay, kw, W, T):
    opt = _opt()
    sched = get_scheduler(decay, opt, warmup_steps=W, total_steps=T, **kw)
    seen = _run(sched, opt, T + 6)  # past the end too
    for t, lrs in enumerate(seen):
        for i, base in enumerate(BASES):
            if "min_lr" in kw:
                floor = kw["min_lr"][i]
            else:
                floor = kw.get("min_lr_ratio", 0.0) * base
            want = _formula(decay, t, base, W, T, floor, kw.get("power", 1.0), kw.get("start_factor", 0.0),
                            kw.get("timescale"))
            assert lrs[i] == pytest.approx(want, rel=1e-12, abs=1e-15), (t, i)
    # the boundaries: peak at t = W, floor at and after T (W + 1 when W == T)
    for i, base in enumerate(BASES):
        assert seen[W][i] == pytest.approx(base)
        if decay in ("cosine", "linear", "polynomial"):
            floor = kw["min_lr"][i] if "min_lr" in kw else kw.get("min_lr_ratio", 0.0) * base
            assert seen[max(T, W + 1)][i] == pytest.approx(floor, abs=1e-15)  # W == T: a one-step decay
            assert seen[-1][i] == pytest.approx(floor, abs=1e-15)


def test_inverse_sqrt_is_transformer_schedule():
    opt = _opt(bases=(1.0,))
    W = 10
    seen = _run(get_scheduler("inverse_sqrt", opt, warmup_steps=W), opt, 50)
    for t in range(W, 50):
        assert seen[t][0] == pytest.approx(math.sqrt(W / t))


@pytest.mark.parametrize("name", ["cosine", "linear", "polynomial", "inverse_sqrt", "constant", "one_cycle"])
def test_resume_mid_way_equals_uninterrupted(name):
    W, T, stop = 4, 20, 9
    kw = dict(power=2.0) if name == "polynomial" else {}
    opt = _opt(cls=torch.optim.AdamW)
    ref = _run(get_scheduler(name, opt, warmup_steps=W, total_steps=T, **kw), opt, T)

    opt1 = _opt(cls=torch.optim.AdamW)
    s1 = get_scheduler(name, opt1, warmup_steps=W, total_steps=T, **kw)
    first = _run(s1, opt1, stop)
    state, opt_state = s1.state_dict(), opt1.state_dict()
    # a new process: build optimizer and scheduler as at the start, then load the states (scheduler first,
    # as torch's docs say, since building a scheduler writes the lrs)
    opt2 = _opt(cls=torch.optim.AdamW)
    s2 = get_scheduler(name, opt2, warmup_steps=W, total_steps=T, **kw)
    s2.load_state_dict(state)
    opt2.load_state_dict(opt_state)
    second = _run(s2, opt2, T - stop)
    assert first + second == ref


def test_param_groups_keep_their_own_base():
    opt = _opt(bases=(1.0, 0.5, 0.25))
    seen = _run(WarmupCosineLR(opt, 3, 10, min_lr_ratio=0.1), opt, 12)
    for lrs in seen:
        assert lrs[1] == pytest.approx(lrs[0] * 0.5) and lrs[2] == pytest.approx(lrs[0] * 0.25)


def test_optimizer_update_uses_scheduled_lr():
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_scheduler("linear", opt, warmup_steps=2, total_steps=6)
    total = 0.0
    for t in range(8):
        p.grad = torch.ones(())
        total += _formula("linear", t, 1.0, 2, 6)
        opt.step()
        sched.step()
        assert p.item() == pytest.approx(-total)


def test_one_cycle_is_torchs():
    opt = _opt(cls=torch.optim.AdamW)
    sched = get_scheduler("one_cycle", opt, warmup_steps=25, total_steps=100)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    ref_opt = _opt(cls=torch.optim.AdamW)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=list(BASES), total_steps=100, pct_start=0.25)
    assert _run(sched, opt, 100) == _run(ref, ref_opt, 100)
    # the peak (max_lr = the groups' lrs) is reached at the end of the warmup
    assert sched.optimizer.param_groups[0]["max_lr"] == BASES[0]


def test_warmup_wrapper_around_recursive_torch_scheduler():
    W, gamma = 5, 0.9
    opt = _opt()
    sched = WarmupLR(opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma), warmup_steps=W, start_factor=0.1)
    seen = _run(sched, opt, 30)
    for t, lrs in enumerate(seen):
        for i, base in enumerate(BASES):
            want = base * (0.1 + 0.9 * t / W) if t < W else base * gamma ** (t - W)
            assert lrs[i] == pytest.approx(want, rel=1e-12), (t, i)


def test_warmup_wrapper_around_cosine_annealing_and_resume():
    W, T = 3, 12

    def build():
        opt = _opt(cls=torch.optim.AdamW)
        inner = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T - W, eta_min=1e-4)
        return opt, WarmupLR(opt, inner, warmup_steps=W)

    opt, sched = build()
    ref = _run(sched, opt, T + 1)  # (torch's CosineAnnealingLR goes up again after T_max)
    for t, lrs in enumerate(ref):
        for i, base in enumerate(BASES):
            want = _formula("cosine", t, base, W, T, floor=1e-4)
            assert lrs[i] == pytest.approx(want, rel=1e-9), (t, i)
    opt1, s1 = build()
    first = _run(s1, opt1, 5)
    state = s1.state_dict()
    opt2, s2 = build()
    s2.load_state_dict(state)
    opt2.load_state_dict(opt1.state_dict())
    assert first + _run(s2, opt2, T + 1 - 5) == ref


def test_warmup_wrapper_around_ours_with_zero_warmup_is_identity():
    opt_a, opt_b = _opt(), _opt()
    a = WarmupLR(opt_a, WarmupDecayLR(opt_a, 0, 10, "linear"), warmup_steps=0)
    b = WarmupDecayLR(opt_b, 0, 10, "linear")
    assert _run(a, opt_a, 12) == _run(b, opt_b, 12)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        get_scheduler("cosin", _opt(), warmup_steps=1, total_steps=10)
    msg = str(e.value)
    assert "'cosin'" in msg
    for name in SCHEDULERS:
        assert name in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps is required"):
        get_scheduler("cosine", _opt(), warmup_steps=1)
    with pytest.raises(ValueError, match="total_steps"):
        get_scheduler("linear", _opt(), warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        get_scheduler("linear", _opt(), warmup_steps=-1, total_steps=5)
    with pytest.raises(TypeError, match="warmup_steps"):
        get_scheduler("linear", _opt(), warmup_steps=1.5, total_steps=5)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        get_scheduler("cosine", _opt(), total_steps=5, min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="min_lr has 1 values"):
        get_scheduler("cosine", _opt(), total_steps=5, min_lr=[0.1])
    with pytest.raises(ValueError, match="power"):
        get_scheduler("polynomial", _opt(), total_steps=5, power=0)
    with pytest.raises(ValueError, match="decay must be one of"):
        WarmupDecayLR(_opt(), 0, 5, "exp")
    with pytest.raises(TypeError, match="optimizer"):
        get_scheduler("cosine", object(), total_steps=5)
    with pytest.raises(ValueError, match="one_cycle"):
        get_scheduler("one_cycle", _opt())
    opt = _opt()
    inner = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner.step()
    with pytest.raises(ValueError, match="freshly built"):
        WarmupLR(opt, inner, 3)
