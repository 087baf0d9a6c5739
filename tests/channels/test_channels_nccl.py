"""NCCLConfig/setup_nccl_env, and a 2-rank gloo all-reduce on the CPU set up through them."""

import os

import pytest

from miniray.channels import (NCCLConfig, NodeConfig, Worker, nccl_configs, restore_nccl_env,
                              setup_nccl_env)

pytestmark = pytest.mark.timeout(120)


def test_setup_and_restore_env(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1111")
    monkeypatch.delenv("RANK", raising=False)
    saved = setup_nccl_env(NCCLConfig(rank=1, world_size=2, master_port=2222,
                                      cuda_visible_devices="3"))
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("1", "2222")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    restore_nccl_env(saved)
    assert os.environ["MASTER_PORT"] == "1111" and "RANK" not in os.environ


def test_rank_outside_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        NCCLConfig(rank=2, world_size=2).env()


def test_configs_across_nodes():
    nodes = [NodeConfig("a", num_workers=2, gpus=[0, 1]), NodeConfig("b", num_workers=1)]
    cfgs = nccl_configs(nodes, master_port=1234)
    assert [(c.rank, c.local_rank, c.world_size) for c in cfgs] == [(0, 0, 3), (1, 1, 3),
                                                                    (2, 0, 3)]
    assert [c.cuda_visible_devices for c in cfgs] == ["0", "1", None]
    assert {c.master_addr for c in cfgs} == {"a"}


def _allreduce(h):
    import torch
    import torch.distributed as dist

    saved = setup_nccl_env(h.recv())
    try:
        dist.init_process_group("gloo", init_method="env://")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        h.send(t.item())
        dist.destroy_process_group()
    finally:
        restore_nccl_env(saved)


def test_gloo_all_reduce_two_ranks():
    pytest.importorskip("torch", reason="torch is not installed: pip install torch (CPU is fine)")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [Worker(_allreduce, codec="pickle") for _ in range(2)]
    try:
        for rank, w in enumerate(workers):
            w.send(NCCLConfig(rank=rank, world_size=2, master_port=port))
        assert [w.recv(timeout=90) for w in workers] == [3.0, 3.0]
    finally:
        for w in workers:
            w.close()
