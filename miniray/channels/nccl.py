"""Rank and rendezvous environment for ``torch.distributed`` (NCCL or gloo) across workers."""

import os
from dataclasses import dataclass

_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "CUDA_VISIBLE_DEVICES")


@dataclass
class NCCLConfig:
    """Everything ``torch.distributed.init_process_group(init_method="env://")`` reads.

    ``cuda_visible_devices`` (e.g. ``"0"`` or ``"2,3"``) pins the rank to its GPUs; ``None``
    leaves the variable untouched.
    """

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_rank: int = 0
    local_world_size: int = 1
    cuda_visible_devices: str = None

    def env(self):
        """The environment variables for this rank, as strings."""
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        env = {"RANK": self.rank, "LOCAL_RANK": self.local_rank, "WORLD_SIZE": self.world_size,
               "LOCAL_WORLD_SIZE": self.local_world_size, "MASTER_ADDR": self.master_addr,
               "MASTER_PORT": self.master_port}
        if self.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        return {k: str(v) for k, v in env.items()}


def setup_nccl_env(config):
    """Export ``config`` into ``os.environ``; return what was there, for ``restore_nccl_env``."""
    saved = {k: os.environ.get(k) for k in _KEYS}
    os.environ.update(config.env())
    return saved


def restore_nccl_env(saved):
    """Undo ``setup_nccl_env``: restore or remove each variable it set."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def nccl_configs(nodes, master_addr=None, master_port=29500):
    """One ``NCCLConfig`` per worker of ``nodes`` (NodeConfigs), ranks in node order.

    The master is the first node unless ``master_addr`` is given; a node's ``gpus`` are dealt
    to its workers round-robin as ``CUDA_VISIBLE_DEVICES``.
    """
    world = sum(n.num_workers for n in nodes)
    master = master_addr or nodes[0].host
    configs, rank = [], 0
    for node in nodes:
        gpus = list(node.gpus or [])
        for local in range(node.num_workers):
            cvd = str(gpus[local % len(gpus)]) if gpus else None
            configs.append(NCCLConfig(rank, world, master, master_port, local,
                                      node.num_workers, cvd))
            rank += 1
    return configs
