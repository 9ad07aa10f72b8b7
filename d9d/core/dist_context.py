"""The distributed context: process group, named device meshes and rank helpers.

``DeviceMeshParameters`` describes how the world is split (pipeline, data, context and
tensor parallelism); ``build()`` turns it into a ``DistributedContext`` holding named
``DeviceMesh`` objects. The same code runs on CPU (gloo) and on accelerators (NCCL or the
accelerator's default backend).

Rank layout (row-major, outermost first): ``pp, dp_replicate, dp_shard, cp_shard,
cp_replicate, tp``. Two views of that one layout are built:

* ``DENSE_DOMAIN``: ``("pp", "dp_replicate", "dp_cp_shard", "cp_replicate", "tp")`` where
  ``dp_cp_shard = data_parallel_shard * context_parallel_shard`` — the dims dense weights
  are sharded/replicated over.
* ``BATCH_DOMAIN``: ``("pp", "dp", "cp", "tp")`` where ``dp = data_parallel_replicate *
  data_parallel_shard`` — ranks that read different samples, used for data loading —
  and ``cp = context_parallel_shard * context_parallel_replicate`` — ranks that hold
  different tokens of the same rows; the global token counts of the loss reduce over
  both (``dp_cp_group``).
"""

import os
from collections.abc import Mapping
from typing import Any, Final

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DENSE_DOMAIN: Final[str] = "dense"
BATCH_DOMAIN: Final[str] = "batch"

DENSE_DIMS: Final[tuple[str, ...]] = ("pp", "dp_replicate", "dp_cp_shard", "cp_replicate", "tp")
BATCH_DIMS: Final[tuple[str, ...]] = ("pp", "dp", "cp", "tp")


class DeviceMeshParameters(BaseModel):
    """How the world is split between the parallelism dimensions.

    Attributes:
        pipeline_parallel: Number of pipeline ranks.
        data_parallel_replicate: Number of replicas of the (sharded) weights.
        data_parallel_shard: Number of ranks the weights are sharded over (FSDP).
        context_parallel_replicate: Context-parallel ranks that replicate weights.
        context_parallel_shard: Context-parallel ranks that also shard weights.
        tensor_parallel: Number of tensor-parallel ranks.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline_parallel: int = Field(default=1, ge=1)
    data_parallel_replicate: int = Field(default=1, ge=1)
    data_parallel_shard: int = Field(default=1, ge=1)
    context_parallel_replicate: int = Field(default=1, ge=1)
    context_parallel_shard: int = Field(default=1, ge=1)
    tensor_parallel: int = Field(default=1, ge=1)

    @property
    def world_size(self) -> int:
        """The number of processes these parameters describe."""
        return (
            self.pipeline_parallel
            * self.data_parallel_replicate
            * self.data_parallel_shard
            * self.context_parallel_replicate
            * self.context_parallel_shard
            * self.tensor_parallel
        )

    def describe(self) -> str:
        """The degrees that multiply to :attr:`world_size`, for messages."""
        return " x ".join(f"{name}={getattr(self, name)}" for name in type(self).model_fields)

    @property
    def is_tensor_parallel(self) -> bool:
        """Whether tensor parallelism is requested."""
        return self.tensor_parallel > 1

    @property
    def is_context_parallel(self) -> bool:
        """Whether context parallelism (sharded or replicated) is requested."""
        return self.context_parallel_shard * self.context_parallel_replicate > 1

    def build(self) -> "DistributedContext":
        """Initialises the default process group if needed and builds the meshes.

        The backend is the device's default (NCCL on CUDA, gloo on CPU). Under
        ``torchrun`` the accelerator of ``LOCAL_RANK`` becomes the current device (of
        ``RANK`` modulo the device count where ``LOCAL_RANK`` is missing); a process not
        started by ``torchrun`` becomes a world of one on the current device. On an
        accelerator the group is bound to the device (``device_id``), which makes NCCL
        create its communicator eagerly and lets the mesh's sub-groups be split from
        it instead of each one bootstrapping its own.

        Returns:
            The distributed context.

        Raises:
            ValueError: If the product of the dimensions is not the world size.
        """
        device = _pick_device()
        if device.type != "cpu":
            # NCCL-style backends bind each rank to the current device.
            torch.accelerator.set_device_index(device.index)
        if not dist.is_initialized():
            dist.init_process_group(**_process_group_kwargs(device, os.environ))
        world_size = dist.get_world_size()
        if self.world_size != world_size:
            raise ValueError(
                f"DeviceMeshParameters describe {self.world_size} processes "
                f"({self.describe()}), but the world size is {world_size}"
            )
        return DistributedContext(self, device)


def _pick_device() -> torch.device:
    # An already initialised CPU-only group (gloo) decides for us; otherwise prefer the
    # accelerator.
    if dist.is_initialized() and dist.get_backend() == "gloo":
        return torch.device("cpu")
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        index = _accelerator_index(
            os.environ,
            torch.accelerator.device_count(),
            torch.accelerator.current_device_index(),
        )
        return torch.device(accelerator.type, index)
    return torch.device("cpu")


def _accelerator_index(env: Mapping[str, str], device_count: int, current: int) -> int:
    """This process's accelerator: by ``LOCAL_RANK``, else ``RANK``, else the current one.

    A launcher that sets ``RANK`` but not ``LOCAL_RANK`` (e.g. one process per node
    slot) still spreads the ranks over the devices; a plain process keeps the device the
    caller made current (``--device cuda:1``).
    """
    for name in ("LOCAL_RANK", "RANK"):
        if name in env:
            return int(env[name]) % device_count
    return current


def _process_group_kwargs(device: torch.device, env: Mapping[str, str]) -> dict[str, Any]:
    """The arguments of ``init_process_group`` for this process.

    Under ``torchrun`` (``RANK`` or ``WORLD_SIZE`` set) the environment gives the rank
    and the rendezvous; otherwise a world of one over an in-process store, so that FSDP2
    (e.g. for mixed precision) and the rest of the stack run unchanged in a plain
    process. On an accelerator ``device_id`` binds the group to the device.
    """
    kwargs: dict[str, Any] = {"backend": dist.get_default_backend_for_device(device)}
    if "RANK" not in env and "WORLD_SIZE" not in env:
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    if device.type != "cpu":
        kwargs["device_id"] = device
    return kwargs


class DistributedContext:
    """Named device meshes and rank helpers for one process.

    Build it with ``DeviceMeshParameters.build()``.

    Attributes:
        params: The parameters the context was built from.
        device: The device this process computes on.
    """

    def __init__(self, params: DeviceMeshParameters, device: torch.device):
        """Builds the meshes; every rank must call this in the same order.

        Args:
            params: The mesh parameters (their product equals the world size).
            device: The device of this process.
        """
        self.params = params
        self.device = device
        p = params
        dense_shape = (
            p.pipeline_parallel,
            p.data_parallel_replicate,
            p.data_parallel_shard * p.context_parallel_shard,
            p.context_parallel_replicate,
            p.tensor_parallel,
        )
        batch_shape = (
            p.pipeline_parallel,
            p.data_parallel_replicate * p.data_parallel_shard,
            p.context_parallel_shard * p.context_parallel_replicate,
            p.tensor_parallel,
        )
        # Both views are row-major over the same rank order, so e.g. the "dp" group of the
        # batch view is exactly the (dp_replicate, dp_shard) part of the dense view.
        self._meshes: dict[str, DeviceMesh] = {
            DENSE_DOMAIN: init_device_mesh(device.type, dense_shape, mesh_dim_names=DENSE_DIMS),
            BATCH_DOMAIN: init_device_mesh(device.type, batch_shape, mesh_dim_names=BATCH_DIMS),
        }
        batch_mesh = self._meshes[BATCH_DOMAIN]
        if batch_shape[1] > 1 and batch_shape[2] > 1:
            # Built here, where every rank builds the context: creating a group is a
            # collective over the whole world.
            self._dp_cp_group = batch_mesh[("dp", "cp")]._flatten("dp_cp").get_group()
        elif batch_shape[2] > 1:
            self._dp_cp_group = batch_mesh.get_group("cp")
        else:
            self._dp_cp_group = batch_mesh.get_group("dp")

    def mesh_for(self, domain: str) -> DeviceMesh:
        """Returns the named mesh of ``domain`` (``DENSE_DOMAIN`` or ``BATCH_DOMAIN``).

        Raises:
            ValueError: For an unknown domain.
        """
        if domain not in self._meshes:
            raise ValueError(f"unknown mesh domain {domain!r}; known: {sorted(self._meshes)}")
        return self._meshes[domain]

    @property
    def rank(self) -> int:
        """Global rank of this process."""
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return dist.get_world_size()

    @property
    def is_main_process(self) -> bool:
        """Whether this is global rank 0 (for logging and single-writer tasks)."""
        return self.rank == 0

    @property
    def pp_rank(self) -> int:
        """This process's position in its pipeline."""
        return self.mesh_for(DENSE_DOMAIN).get_local_rank("pp")

    @property
    def pp_size(self) -> int:
        """Number of pipeline ranks."""
        return self.params.pipeline_parallel

    @property
    def pp_group(self) -> dist.ProcessGroup:
        """The process group linking the stages of this process's pipeline."""
        return self.mesh_for(DENSE_DOMAIN).get_group("pp")

    @property
    def dp_rank(self) -> int:
        """Index of the data shard this process reads (same for all pp/cp/tp peers)."""
        return self.mesh_for(BATCH_DOMAIN).get_local_rank("dp")

    @property
    def dp_size(self) -> int:
        """Number of distinct data shards (``data_parallel_replicate * data_parallel_shard``)."""
        return self.params.data_parallel_replicate * self.params.data_parallel_shard

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks that read different samples (the loss counts: :attr:`dp_cp_group`)."""
        return self.mesh_for(BATCH_DOMAIN).get_group("dp")

    @property
    def cp_rank(self) -> int:
        """This rank's index in its context-parallel group (which tokens of a row it holds)."""
        return self.mesh_for(BATCH_DOMAIN).get_local_rank("cp")

    @property
    def cp_size(self) -> int:
        """The context-parallel degree (``context_parallel_shard * context_parallel_replicate``)."""
        return self.params.context_parallel_shard * self.params.context_parallel_replicate

    @property
    def cp_group(self) -> dist.ProcessGroup:
        """The ranks that hold different tokens of the same rows."""
        return self.mesh_for(BATCH_DOMAIN).get_group("cp")

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        """Every rank that holds different tokens: data-parallel x context-parallel.

        Global token counts and the logged loss reduce over it (``dp_group`` when there
        is no context parallelism).
        """
        return self._dp_cp_group

    def local_pipeline_stages(self, num_stages_per_rank: int = 1) -> list[int]:
        """Global indices of the pipeline stages this rank runs.

        Stages are assigned round-robin ("loop" style, as Interleaved1F1B expects):
        with 2 ranks and 2 stages per rank, rank 0 runs stages 0 and 2.

        Args:
            num_stages_per_rank: Virtual stages per pipeline rank.
        """
        if num_stages_per_rank < 1:
            raise ValueError(f"num_stages_per_rank must be >= 1, got {num_stages_per_rank}")
        return [self.pp_rank + i * self.pp_size for i in range(num_stages_per_rank)]
