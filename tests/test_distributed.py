"""mltoolkit.distributed: DDP (comm hooks, no_sync, checkpoints), FSDP2 (sharded DCP checkpoints, resume in a fresh
process group), tensor parallel, DTensor support of mltoolkit's AdamW / LAMB / clip_grad_norm_, data sharding.

The multi-process checks run in 2 processes on the CPU over gloo (tests/dist_workers.py): one spawn runs the DDP,
FSDP and TP checks against single-process references with the same global batch, a second, fresh one resumes from the
sharded checkpoint the first wrote. The rest runs in this process."""
from __future__ import annotations

import socket

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mltoolkit.distributed as mdist
from mltoolkit.distributed import DDPStrategy, DistributedResumableSampler, FSDPStrategy, TensorParallelStrategy
from mltoolkit.distributed.tensor_parallel import TinyTransformer, resolve_plan
from mltoolkit.train import ResumableSampler

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_two_process_ddp_fsdp_tp_match_single_process_and_resume(tmp_path):
    """DDP (plain, fp16 / bf16 hooks, no_sync, PowerSGD, rank-0 checkpoint), FSDP2 (mltoolkit AdamW / LAMB and
    torch AdamW with sharded clipping, bf16, no_sync, DCP checkpoints with keep_last), TP (default plan, local heads,
    AdamW / LAMB, bad plans); then, in a fresh process group with newly built objects, resume from the sharded
    checkpoint and continue exactly as the run that went on."""
    import torch.multiprocessing as mp

    from tests import dist_workers
    groups = [["ddp", "fsdp", "tp"], ["fsdp_resume"]]
    mp.spawn(dist_workers.worker, args=(2, _free_ports(2), str(tmp_path), groups), nprocs=2, join=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="this torch has no NCCL")
def test_one_gpu_nccl_group_trains_with_ddp_and_fsdp():
    """NCCL on a GPU (the multi-process checks above run over gloo on the CPU; the GPU machines lent here have one
    GPU): a one-rank NCCL group, DDP and FSDP2 on CUDA tensors, against plain single-GPU training."""
    import torch.multiprocessing as mp

    from tests import dist_workers
    mp.spawn(dist_workers.nccl_one_gpu, args=(1, _free_ports(1)[0]), nprocs=1, join=True)


# -- single process ---------------------------------------------------------------------------------------------------


def test_strategies_registered():
    assert isinstance(mdist.get_strategy("ddp"), DDPStrategy)
    assert isinstance(mdist.get_strategy("fsdp", mixed_precision="bf16"), FSDPStrategy)
    assert isinstance(mdist.get_strategy("tp"), TensorParallelStrategy)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown comm_hook 'int8'"):
        DDPStrategy(comm_hook="int8")
    with pytest.raises(ValueError, match="powersgd_rank"):
        DDPStrategy(comm_hook="powersgd", powersgd_rank=0)
    with pytest.raises(ValueError, match="powersgd_start_iter"):
        DDPStrategy(comm_hook="powersgd", powersgd_start_iter=1)
    with pytest.raises(ValueError, match="mixed_precision"):
        FSDPStrategy(mixed_precision="int8")
    with pytest.raises(TypeError, match="shard_modules"):
        FSDPStrategy(shard_modules="Block")
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match=r"call strategy.setup\(\) first"):
            DDPStrategy().prepare(torch.nn.Linear(2, 2), lambda ps: torch.optim.SGD(ps, lr=0.1))


def test_tp_plan_errors():
    model = TinyTransformer(depth=2)
    plan, heads = resolve_plan(model, mdist.DEFAULT_PLAN, 2)
    assert sorted(plan)[:2] == ["layers.0.attn.k_proj", "layers.0.attn.out_proj"] and len(plan) == 12
    assert heads == {"layers.0.attn.num_heads": 2, "layers.1.attn.num_heads": 2}
    with pytest.raises(ValueError, match="'mlp.up' matches no module"):
        resolve_plan(model, {"mlp.up": "colwise"}, 2)
    with pytest.raises(ValueError, match="4 attention heads is not divisible by the tensor-parallel size 3"):
        resolve_plan(TinyTransformer(dim=48, num_heads=4, depth=1), {"attn.q_proj": "colwise"}, 3)
    with pytest.raises(ValueError, match="out_features=32, not divisible"):
        resolve_plan(model, {"*.mlp.fc2": "colwise"}, 3)
    with pytest.raises(ValueError, match="use 'colwise', 'rowwise'"):
        resolve_plan(model, {"attn.q_proj": "diagonal"}, 2)
    with pytest.raises(ValueError, match="is a LayerNorm"):
        resolve_plan(model, {"ln1": "colwise"}, 2)


@pytest.mark.parametrize("n,world,drop_last", [(10, 2, False), (11, 2, False), (11, 3, True), (7, 4, False)])
def test_sampler_shards_are_disjoint_and_cover(n, world, drop_last):
    shards = [list(DistributedResumableSampler(n, num_replicas=world, rank=r, seed=5, drop_last=drop_last))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat) == (n // world) * world
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
        if n % world == 0:
            assert len(set(flat)) == n   # disjoint
    # the same order as the single-process ResumableSampler, dealt round-robin
    order = ResumableSampler(n, seed=5).permutation(0)
    assert [shards[r][0] for r in range(world)] == order[:world]
    # torch's DistributedSampler partition for the same order
    assert shards[0] == DistributedResumableSampler(n, num_replicas=world, rank=0, seed=5,
                                                    drop_last=drop_last).shard(0)


def test_sampler_resume_and_world_size_change():
    s = [DistributedResumableSampler(18, num_replicas=2, rank=r, seed=1) for r in range(2)]
    its = [iter(x) for x in s]
    seen = [[next(it) for _ in range(3)] for it in its]         # 6 samples of the epoch consumed
    state = s[0].state_dict()
    assert state["index"] == 6 and state["world_size"] == 2
    rest = [list(it) for it in its]
    for r in range(2):                                           # restore into fresh samplers of the same world
        t = DistributedResumableSampler(18, num_replicas=2, rank=r, seed=1)
        t.load_state_dict(state)
        assert list(t) == rest[r] and t.epoch == 1
    # into 3 ranks: together they yield exactly the samples not yet seen
    t3 = [DistributedResumableSampler(18, num_replicas=3, rank=r, seed=1) for r in range(3)]
    for t in t3:
        t.load_state_dict(state)
    rem = sorted(i for t in t3 for i in t)
    assert set(rem) == set(range(18)) - {i for x in seen for i in x}
    with pytest.raises(Exception, match="18 samples"):
        DistributedResumableSampler(21, num_replicas=2, rank=0).load_state_dict(state)
    # set_epoch of the current epoch does not undo a resume; another epoch restarts
    t = DistributedResumableSampler(18, num_replicas=2, rank=0, seed=1)
    t.load_state_dict(state)
    t.set_epoch(0)
    assert list(t) == rest[0]
    t.set_epoch(3)
    assert list(t) == t.shard(3)
    with pytest.raises(ValueError, match="rank"):
        DistributedResumableSampler(5, num_replicas=2, rank=2)


def test_shard_loader_keeps_batch_size_and_loader_settings():
    from mltoolkit.distributed.sampler import shard_loader
    ds = TensorDataset(torch.arange(12.0))
    g = torch.Generator()
    loader = DataLoader(ds, batch_size=3, sampler=ResumableSampler(12, seed=2), generator=g, drop_last=True)
    a, b = shard_loader(loader, 0, 2), shard_loader(loader, 1, 2)
    assert isinstance(a.sampler, DistributedResumableSampler) and a.batch_size == 3 and a.drop_last
    assert a.generator is g and len(a) == 2
    xa = torch.cat([x for (x,) in a])
    xb = torch.cat([x for (x,) in b])
    assert sorted(torch.cat([xa, xb]).tolist()) == list(range(12))
    shuffled = shard_loader(DataLoader(ds, batch_size=2, shuffle=True), 1, 2)
    assert isinstance(shuffled.sampler, torch.utils.data.DistributedSampler) and shuffled.sampler.shuffle
    assert shard_loader(shuffled, 1, 2) is shuffled
    with pytest.raises(ValueError, match="batch_sampler"):
        shard_loader(DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]), 0, 2)


def test_sharded_checkpointer_atomic_keep_last_and_fallback(tmp_path, monkeypatch):
    """ShardedCheckpointer without a process group (one process, plain tensors): rotation, a failed save that
    publishes nothing, fallback past an incomplete checkpoint, and a clear error for another model."""
    import os

    import torch.distributed.checkpoint as dcp

    from mltoolkit.distributed import ShardedCheckpointer
    from mltoolkit.optim import AdamW
    from mltoolkit.train import CheckpointMismatchError

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        return m, AdamW(m.parameters(), lr=0.1)

    model, opt = make()
    ck = ShardedCheckpointer(str(tmp_path), keep_last=2)
    saved = {}
    for step in (1, 2, 3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        ck.save(step, model=model, optimizer=opt, sampler={"epoch": 0, "index": step}, extra={"s": step})
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".dcp")) == ["ckpt-00000002.dcp", "ckpt-00000003.dcp"]
    pointer = open(ck.pointer_path).read()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(dcp, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save(4, model=model, optimizer=opt)
    monkeypatch.undo()
    assert open(ck.pointer_path).read() == pointer
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000002.dcp", "ckpt-00000003.dcp", "ckpt-dcp-latest.json"]

    fresh, fresh_opt = make()
    got = ck.load_latest(model=fresh, optimizer=fresh_opt)
    assert got.step == 3 and got.extra == {"s": 3} and got.state["sampler"] == {"epoch": 0, "index": 3}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[3].items())
    assert fresh_opt.state[fresh.weight]["step"].item() == 3
    os.unlink(os.path.join(ck.path_for(3), ".metadata"))          # newest incomplete: fall back to step 2
    with pytest.warns(UserWarning, match="incomplete"):
        got = ck.load_latest(model=fresh, optimizer=fresh_opt)
    assert got.step == 2 and all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[2].items())
    with pytest.raises(CheckpointMismatchError, match="different model"), pytest.warns(UserWarning, match="incomplete"):
        ck.load_latest(model=torch.nn.Linear(4, 5))
