"""Worker processes of tests/test_distributed.py: each rank of a 2-process gloo group on the CPU runs several checks
against a single-process reference computed in the same process (same seed, same global batch)."""
from __future__ import annotations

import gc
import os
import time
import traceback

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DIM_IN, N, GLOBAL_BATCH = 8, 32, 8


def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import warnings
    # F.linear on a 3-D input returns a view; the models here never modify their outputs in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM_IN, 16), nn.Tanh(), nn.Linear(16, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, DIM_IN, generator=g), torch.randn(N, 4, generator=g)


def _tokens():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 64, (N, 9), generator=g)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters. The key-projection bias is left out: its exact gradient is 0 (softmax is invariant to it),
    so Adam turns the rounding noise of its computed gradient into full-size steps that differ between runs."""
    from mltoolkit.distributed._dtensor import is_dtensor
    return {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()
            if not n.endswith("k_proj.bias")}


def _close(a, b, atol, rtol, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
        for k in a:
            _close(a[k], b[k], atol, rtol, f"{what}[{k}]")
        return
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs diff {err:.3g}\n{a}\n{b}"


def _lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _mse_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _reference(make_model, make_opt, batches, loss_fn, clip=None):
    """Single process, full global batches: losses (and grad norms) per step, final parameters."""
    model = make_model()
    opt = make_opt(model.parameters())
    losses, norms = [], []
    for b in batches:
        opt.zero_grad()
        loss = loss_fn(model, b)
        loss.backward()
        if clip is not None:
            from mltoolkit.optim import clip_grad_norm_
            norms.append(float(clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        losses.append(loss.item())
    return losses, norms, _full(model)


def _train(strategy, model, opt, batches, loss_fn, clip=None, micro=1):
    losses, norms = [], []
    for b in batches:
        opt.zero_grad()
        parts = [tuple(t.chunk(micro)[i] for t in b) if isinstance(b, tuple) else b.chunk(micro)[i]
                 for i in range(micro)]
        total = 0.0
        for i, part in enumerate(parts):
            ctx = strategy.no_sync(model) if i < micro - 1 else _null()
            with ctx:
                loss = loss_fn(model, part) / micro
                loss.backward()
            total += loss.item()
        if clip is not None:
            norms.append(float(strategy.clip_grad_norm_(model, clip)))
        opt.step()
        losses.append(strategy.reduce_mean(torch.tensor(total)))
    return losses, norms


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _rank_batches(loader):
    return [tuple(t for t in b) if isinstance(b, (list, tuple)) else b for b in loader]


# --------------------------------------------------------------------------------------------------------------------


def check_ddp(rank: int, world: int, tmp: str) -> None:
    from mltoolkit.distributed import DDPStrategy
    from mltoolkit.optim import AdamW
    from mltoolkit.train import ResumableSampler

    x, y = _data()
    ds = TensorDataset(x, y)
    make_opt = lambda ps: AdamW(ps, lr=1e-2)  # noqa: E731
    sampler = ResumableSampler(N, seed=3)
    glob = [(x[idx], y[idx]) for idx in torch.tensor(sampler.permutation(0)).split(GLOBAL_BATCH)]
    ref_losses, ref_norms, ref_params = _reference(_mlp, make_opt, glob, _mse_loss, clip=0.5)
    for hook, atol in ((None, 1e-6), ("fp16", 2e-3), ("bf16", 2e-2)):
        strategy = DDPStrategy(comm_hook=hook)
        strategy.setup()
        model, opt = strategy.prepare(_mlp(), make_opt)
        loader = strategy.prepare_loader(DataLoader(ds, batch_size=GLOBAL_BATCH // world,
                                                    sampler=ResumableSampler(N, seed=3)))
        assert len(loader) == N // GLOBAL_BATCH
        losses, norms = _train(strategy, model, opt, _rank_batches(loader), _mse_loss, clip=0.5)
        _close(losses, ref_losses, atol, 1e-4, f"ddp[{hook}] losses")
        _close(norms, ref_norms, atol, 1e-3, f"ddp[{hook}] grad norms")
        _close(_full(strategy.unwrap(model)), ref_params, atol * 10, 1e-3, f"ddp[{hook}] params")
    # no_sync accumulation: 2 micro-batches per rank = one step on the big batch
    strategy = DDPStrategy()
    model, opt = strategy.prepare(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.1))
    big = [(x[:16], y[:16]), (x[16:], y[16:])]
    ref_losses, _, ref_params = _reference(_mlp, lambda ps: torch.optim.SGD(ps, lr=0.1), big, _mse_loss)
    mine = [(b[0][rank::world], b[1][rank::world]) for b in big]
    losses, _ = _train(strategy, model, opt, mine, _mse_loss, micro=2)
    _close(losses, ref_losses, 1e-6, 1e-5, "ddp no_sync losses")
    _close(_full(model.module), ref_params, 1e-6, 1e-5, "ddp no_sync params")
    # checkpoint: rank 0 writes one file, every rank loads it (and gets its own RNG state back)
    from mltoolkit.train import CheckpointManager
    mgr = CheckpointManager(os.path.join(tmp, "ddp"), keep_last=2)
    torch.manual_seed(100 + rank)
    path = strategy.save_checkpoint(mgr, 7, model=model, optimizer=opt, extra={"k": 1})
    assert (path is not None) == (rank == 0)
    draw = torch.rand(3)
    fresh, fresh_opt = strategy.prepare(nn.Sequential(nn.Linear(DIM_IN, 16), nn.Tanh(), nn.Linear(16, 4)),
                                        lambda ps: torch.optim.SGD(ps, lr=0.1))
    ck = strategy.load_checkpoint(mgr, model=fresh, optimizer=fresh_opt)
    assert ck.step == 7 and ck.extra == {"k": 1}, (ck.step, ck.extra)
    assert torch.equal(torch.rand(3), draw), "per-rank RNG state not restored"
    _close(_full(fresh.module), _full(model.module), 0.0, 0.0, "ddp loaded params")
    # PowerSGD (rank 1, warm start) trains: the loss falls
    strategy = DDPStrategy(comm_hook="powersgd", powersgd_rank=1)
    model, opt = strategy.prepare(_mlp(), lambda ps: AdamW(ps, lr=3e-2))
    steps = [(x[rank::world], y[rank::world])] * 20
    losses, _ = _train(strategy, model, opt, steps, _mse_loss)
    assert losses[-1] < 0.8 * losses[0], f"PowerSGD did not train: {losses[0]} -> {losses[-1]}"
    assert strategy.hook_state.iter >= 20


def _fsdp_parts():
    from mltoolkit.distributed import TinyTransformer
    toks = _tokens()
    glob = list(toks.split(GLOBAL_BATCH))
    return (lambda: (torch.manual_seed(0), TinyTransformer(depth=2))[1]), toks, glob


def check_fsdp(rank: int, world: int, tmp: str) -> None:
    from mltoolkit.distributed import FSDPStrategy
    from mltoolkit.optim import LAMB, AdamW
    from mltoolkit.train import CheckpointManager

    make_model, toks, glob = _fsdp_parts()
    mine = [b[rank::world] for b in glob]
    for name, make_opt, atol in (("mltk AdamW", lambda ps: AdamW(ps, lr=1e-2), 2e-5),
                                 ("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-2), 2e-5),
                                 ("mltk LAMB", lambda ps: LAMB(ps, lr=1e-2), 2e-5)):
        ref_losses, ref_norms, ref_params = _reference(make_model, make_opt, glob, _lm_loss, clip=1.0)
        strategy = FSDPStrategy()
        strategy.setup()
        model, opt = strategy.prepare(make_model(), make_opt)
        losses, norms = _train(strategy, model, opt, mine, _lm_loss, clip=1.0)
        _close(losses, ref_losses, atol, 1e-5, f"fsdp[{name}] losses")
        _close(norms, ref_norms, atol, 1e-5, f"fsdp[{name}] grad norms")
        _close(_full(model), ref_params, atol * 5, 1e-4, f"fsdp[{name}] params")
    # uneven shards (5 and 3 rows over 2 ranks): LAMB's trust ratios and the clip norm over the full tensors
    x, y = _data()

    def odd():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(DIM_IN, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 4))
    glob_xy = [(x[i:i + GLOBAL_BATCH], y[i:i + GLOBAL_BATCH]) for i in range(0, N, GLOBAL_BATCH)]
    ref_losses, ref_norms, ref_params = _reference(odd, lambda ps: LAMB(ps, lr=1e-2), glob_xy, _mse_loss, clip=0.3)
    strategy = FSDPStrategy(shard_modules=nn.Linear)
    model, opt = strategy.prepare(odd(), lambda ps: LAMB(ps, lr=1e-2))
    losses, norms = _train(strategy, model, opt, [(a[rank::world], b[rank::world]) for a, b in glob_xy], _mse_loss,
                           clip=0.3)
    _close(losses, ref_losses, 2e-6, 1e-5, "fsdp uneven LAMB losses")
    _close(norms, ref_norms, 2e-6, 1e-5, "fsdp uneven grad norms")
    _close(_full(model), ref_params, 1e-5, 1e-4, "fsdp uneven LAMB params")
    # bf16 mixed precision: close to the fp32 reference
    strategy = FSDPStrategy(mixed_precision="bf16", reshard_after_forward=False)
    model, opt = strategy.prepare(make_model(), lambda ps: AdamW(ps, lr=1e-2))
    losses, _ = _train(strategy, model, opt, mine, _lm_loss)
    ref_losses, _, _ = _reference(make_model, lambda ps: AdamW(ps, lr=1e-2), glob, _lm_loss)
    _close(losses, ref_losses, 5e-2, 2e-2, "fsdp bf16 losses")
    # no_sync accumulation
    strategy = FSDPStrategy()
    model, opt = strategy.prepare(make_model(), lambda ps: AdamW(ps, lr=1e-2))
    big = [toks[:16], toks[16:]]
    ref_losses, _, ref_params = _reference(make_model, lambda ps: AdamW(ps, lr=1e-2), big, _lm_loss)
    losses, _ = _train(strategy, model, opt, [b[rank::world] for b in big], _lm_loss, micro=2)
    _close(losses, ref_losses, 2e-5, 1e-5, "fsdp no_sync losses")
    _close(_full(model), ref_params, 1e-4, 1e-4, "fsdp no_sync params")
    # sharded checkpoint: 2 steps, save, 2 more steps (the expected continuation)
    strategy = FSDPStrategy()
    model, opt = strategy.prepare(make_model(), lambda ps: AdamW(ps, lr=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    mgr = CheckpointManager(tmp, keep_last=2)
    for step in range(3):
        _train(strategy, model, opt, [mine[step]], _lm_loss)
        sched.step()
        strategy.save_checkpoint(mgr, step + 1, model=model, optimizer=opt, scheduler=sched,
                                 sampler={"epoch": 0, "index": 8 * (step + 1)}, extra={"note": "x"})
    dirs = sorted(d for d in os.listdir(tmp) if d.endswith(".dcp"))
    assert dirs == ["ckpt-00000002.dcp", "ckpt-00000003.dcp"], dirs
    loss = _train(strategy, model, opt, [glob[0][rank::world]], _lm_loss)[0]
    torch.save({"params": _full(model), "loss": loss}, os.path.join(tmp, f"expected-{rank}.pt"))


def check_fsdp_resume(rank: int, world: int, tmp: str) -> None:
    """A fresh process group: load the newest sharded checkpoint (step 3), one more step equals the run that went on."""
    from mltoolkit.distributed import FSDPStrategy, TinyTransformer
    from mltoolkit.optim import AdamW
    from mltoolkit.train import CheckpointManager, CheckpointMismatchError

    make_model, toks, glob = _fsdp_parts()
    strategy = FSDPStrategy()
    strategy.setup()
    torch.manual_seed(123)  # another initialisation: everything must come from the checkpoint
    model, opt = strategy.prepare(TinyTransformer(depth=2), lambda ps: AdamW(ps, lr=0.5))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    ck = strategy.load_checkpoint(CheckpointManager(tmp, keep_last=2), model=model, optimizer=opt, scheduler=sched)
    assert ck is not None and ck.step == 3 and ck.extra == {"note": "x"}, ck
    assert ck.state["sampler"] == {"epoch": 0, "index": 24}
    assert abs(opt.param_groups[0]["lr"] - 1e-2 * 0.9 ** 3) < 1e-12, opt.param_groups[0]["lr"]
    loss = _train(strategy, model, opt, [glob[0][rank::world]], _lm_loss)[0]
    expected = torch.load(os.path.join(tmp, f"expected-{rank}.pt"))
    assert loss == expected["loss"], (loss, expected["loss"])
    _close(_full(model), expected["params"], 0.0, 0.0, "fsdp resumed params")
    # a checkpoint of another model: clear error, nothing loaded
    other, opt2 = FSDPStrategy().prepare(TinyTransformer(depth=1), lambda ps: AdamW(ps))
    try:
        strategy.load_checkpoint(CheckpointManager(tmp), model=other, optimizer=opt2)
    except CheckpointMismatchError as e:
        assert "different model" in str(e) and "layers.1" in str(e), e
    else:
        raise AssertionError("loading another model's checkpoint did not raise")


def check_tp(rank: int, world: int) -> None:
    from mltoolkit.distributed import TensorParallelStrategy, TinyTransformer
    from mltoolkit.optim import LAMB, AdamW

    make_model, toks, glob = _fsdp_parts()
    # (torch.optim.AdamW on DTensor parameters: checked under FSDP)
    for name, make_opt in (("mltk AdamW", lambda ps: AdamW(ps, lr=1e-2)), ("mltk LAMB", lambda ps: LAMB(ps, lr=1e-2))):
        ref_losses, ref_norms, ref_params = _reference(make_model, make_opt, glob, _lm_loss, clip=1.0)
        strategy = TensorParallelStrategy()
        strategy.setup()
        model, opt = strategy.prepare(make_model(), make_opt)
        assert model.layers[0].attn.num_heads == 4 // world
        assert tuple(model.layers[0].attn.q_proj.weight.to_local().shape) == (32 // world, 32)
        loader = strategy.prepare_loader(DataLoader(TensorDataset(toks), batch_size=GLOBAL_BATCH))
        batches = [b[0] for b in loader]
        assert all(torch.equal(a, b) for a, b in zip(batches, glob))
        losses, norms = _train(strategy, model, opt, batches, _lm_loss, clip=1.0)
        _close(losses, ref_losses, 2e-5, 1e-5, f"tp[{name}] losses")
        _close(norms, ref_norms, 2e-5, 1e-5, f"tp[{name}] grad norms")
        _close(_full(model), ref_params, 1e-4, 1e-4, f"tp[{name}] params")
    # bad plans and head counts: clear errors, before the model is touched
    strategy = TensorParallelStrategy(plan={"attn.q_proj": "colwise", "attn.nope": "rowwise"})
    try:
        strategy.prepare(TinyTransformer(depth=1), lambda ps: AdamW(ps))
    except ValueError as e:
        assert "'attn.nope' matches no module" in str(e), e
    else:
        raise AssertionError("missing module in the plan did not raise")
    try:
        TensorParallelStrategy().prepare(TinyTransformer(dim=30, num_heads=3, depth=1), lambda ps: AdamW(ps))
    except ValueError as e:
        assert "3 attention heads is not divisible by the tensor-parallel size 2" in str(e), e
    else:
        raise AssertionError("heads not divisible by the world size did not raise")


CHECKS = {"ddp": check_ddp, "fsdp": check_fsdp, "fsdp_resume": check_fsdp_resume, "tp": check_tp}


def nccl_one_gpu(rank: int, world: int, port: int) -> None:
    """A one-rank NCCL group on this process's GPU: DDP (plain, bf16 hook) and FSDP2 train on CUDA tensors with
    mltoolkit's AdamW and clipping, against plain single-GPU training with the same batches."""
    import torch.distributed as dist

    from mltoolkit.distributed import DDPStrategy, FSDPStrategy, init_process_group
    from mltoolkit.optim import AdamW

    _setup(rank, world, port)
    assert init_process_group() == "nccl"
    try:
        dev = torch.device("cuda", torch.cuda.current_device())
        x, y = _data()
        batches = [(x[i:i + GLOBAL_BATCH].to(dev), y[i:i + GLOBAL_BATCH].to(dev)) for i in range(0, N, GLOBAL_BATCH)]
        make_opt = lambda ps: AdamW(ps, lr=1e-2)  # noqa: E731
        ref_losses, ref_norms, ref_params = _reference(lambda: _mlp().to(dev), make_opt, batches, _mse_loss, clip=0.5)
        ref_params = {k: v.cpu() for k, v in ref_params.items()}
        for name, strategy, atol in (("ddp", DDPStrategy(), 1e-5),
                                     ("ddp bf16 hook", DDPStrategy(comm_hook="bf16"), 2e-2),
                                     ("fsdp", FSDPStrategy(), 1e-5)):
            strategy.setup()
            assert strategy.device == dev, (name, strategy.device)
            model, opt = strategy.prepare(_mlp(), make_opt)
            losses, norms = _train(strategy, model, opt, batches, _mse_loss, clip=0.5)
            _close(losses, ref_losses, atol, 1e-4, f"{name} losses")
            _close(norms, ref_norms, atol, 1e-3, f"{name} grad norms")
            params = _full(strategy.unwrap(model) if isinstance(strategy, DDPStrategy) else model)
            _close({k: v.cpu() for k, v in params.items()}, ref_params, atol * 10, 1e-3, f"{name} params")
        quiesce()
    finally:
        dist.destroy_process_group()


def quiesce() -> None:
    """Before the group is destroyed: free the checks' Trainers (DDP / FSDP state, reference cycles through callbacks)
    while the interpreter is fully alive, then wait for the other rank. Left to interpreter finalization, gloo's worker
    threads release the last collectives' tensors, take the GIL during shutdown and abort the process (SIGABRT,
    "terminate called without an active exception"; seen once in CI)."""
    import torch.distributed as dist
    gc.collect()
    dist.barrier()


def worker(rank: int, world: int, ports: list[int], tmp: str, groups: list[list[str]]) -> None:
    """Runs each list of checks of `groups` in its own process group (a fresh group on the next port: the resume
    check loads, in a new group with newly built objects, the checkpoint the previous group wrote)."""
    import torch.distributed as dist

    from mltoolkit.distributed import init_process_group
    for port, names in zip(ports, groups):
        _setup(rank, world, port)
        init_process_group("gloo")
        try:
            for name in names:
                fn = CHECKS[name]
                t0 = time.perf_counter()
                try:
                    fn(rank, world, tmp) if name != "tp" else fn(rank, world)
                except BaseException as e:
                    raise AssertionError(f"rank {rank}, check {name}: {type(e).__name__}: {e}\n"
                                         f"{traceback.format_exc()}") from None
                if rank == 0 and os.environ.get("MLTK_DIST_TIMES"):
                    print(f"check {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            quiesce()
        finally:
            dist.destroy_process_group()
