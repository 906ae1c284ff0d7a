"""Process groups: the launcher's environment, the group's life cycle and the collectives.

``from dinoscale import distributed`` then ``distributed.get_rank()``, ``distributed.init_distributed()``,
...: this package's API, gathered from its three modules:

* :mod:`~dinoscale.distributed.env`: torchrun / SLURM variables into a :class:`DistInfo`, the job's port;
* :mod:`~dinoscale.distributed.init`: rendezvous, init and destroy of the process group, seeding;
* :mod:`~dinoscale.distributed.collectives`: rank, world size and collectives, no-ops in a single process.
"""

from dinoscale.distributed.collectives import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_sum_,
    barrier,
    get_rank,
    get_world_size,
    hide_process_group,
    is_enabled,
    is_main_process,
)
from dinoscale.distributed.env import (
    ARRIVAL_TIMEOUT_ENV,
    DEFAULT_ARRIVAL_TIMEOUT_S,
    DistInfo,
    DistributedEnvError,
    dist_info_from_env,
    expand_slurm_nodelist,
    get_arrival_timeout_s,
    master_port_for_job,
    parse_slurm_nodelist,
)
from dinoscale.distributed.init import (
    destroy_distributed,
    find_free_port,
    init_distributed,
    monitored_barrier,
    seed_everything,
)

__all__ = [
    "ARRIVAL_TIMEOUT_ENV",
    "DEFAULT_ARRIVAL_TIMEOUT_S",
    "DistInfo",
    "DistributedEnvError",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_sum_",
    "barrier",
    "destroy_distributed",
    "dist_info_from_env",
    "expand_slurm_nodelist",
    "find_free_port",
    "get_arrival_timeout_s",
    "get_rank",
    "get_world_size",
    "hide_process_group",
    "init_distributed",
    "is_enabled",
    "is_main_process",
    "master_port_for_job",
    "monitored_barrier",
    "parse_slurm_nodelist",
    "seed_everything",
]
