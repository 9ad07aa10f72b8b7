"""Generic data-parallel building block: FSDP2 / HSDP over a named device mesh."""

from collections.abc import Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def parallelize_hsdp(
    module: nn.Module | Sequence[nn.Module],
    mesh: DeviceMesh,
    shard_dim: str = "dp_cp_shard",
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | None = None,
) -> FSDPModule | list[FSDPModule]:
    """Makes ``module`` one FSDP2 unit, sharded over ``shard_dim`` (HSDP).

    The parameters are sharded over ``shard_dim`` and replicated over every other dim of
    ``mesh`` whose size is above 1. ``fully_shard`` only takes 1-D (shard) or 2-D
    (replicate, shard) meshes, so several replicate dims are flattened into one.

    Gradients are **summed** over all data-parallel ranks (FSDP2 would average them):
    normalise the loss by the global count of whatever it averages over.

    Args:
        module: A module, or several modules that form one unit (one all-gather and one
            reduce-scatter, e.g. the final norm with the output head).
        mesh: A mesh with named dims, e.g. the ``("dp_replicate", "dp_cp_shard",
            "cp_replicate")`` slice of the dense mesh.
        shard_dim: The dim the parameters are sharded over.
        mp_policy: Mixed-precision policy (default: no casting).
        reshard_after_forward: ``fully_shard``'s argument (``None``: FSDP2's default).

    Returns:
        The module(s), now FSDP2 modules.

    Raises:
        ValueError: If ``mesh`` has no dim names or does not contain ``shard_dim``.
    """
    names = mesh.mesh_dim_names
    if names is None:
        raise ValueError("parallelize_hsdp needs a mesh with named dims (mesh_dim_names)")
    if shard_dim not in names:
        raise ValueError(f"shard_dim {shard_dim!r} is not a dim of the mesh {names}")
    fsdp_mesh = _hsdp_mesh(mesh, shard_dim)
    modules = module if isinstance(module, nn.Module) else list(module)
    sharded = fully_shard(
        modules,
        mesh=fsdp_mesh,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
        reshard_after_forward=reshard_after_forward,
    )
    for unit in [sharded] if isinstance(sharded, FSDPModule) else sharded:
        # The default averages over the DP ranks; a plain sum is what makes a loss
        # normalised by the *global* count reproduce the single-device gradient. The
        # factor alone would need PREMUL_SUM (not on gloo); forcing SUM alone would still
        # post-divide by the DP size: together they give a plain sum on every backend.
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_gradient_divide_factor(1.0)
    return sharded


def _hsdp_mesh(mesh: DeviceMesh, shard_dim: str) -> DeviceMesh:
    names = mesh.mesh_dim_names
    replicate_dims = tuple(
        name for name in names if name != shard_dim and mesh.size(names.index(name)) > 1
    )
    if not replicate_dims:
        return mesh[shard_dim]
    if len(replicate_dims) == 1:
        return mesh[(replicate_dims[0], shard_dim)]
    flat_name = "_".join(replicate_dims)
    # The replicate dims need not be adjacent (dp_replicate and cp_replicate sit on either
    # side of dp_cp_shard): flatten them, then pair the result with the shard dim. Both
    # pieces reuse process groups cached on the root mesh, so repeated calls are cheap.
    replicate = mesh[replicate_dims]._flatten(flat_name)
    return DeviceMesh._concatenate([replicate, mesh[shard_dim]])
