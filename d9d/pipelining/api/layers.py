"""How transformer layers are split between pipeline stages."""

from d9d.pipelining.api.stage import PipelineStageInfo


def distribute_layers_for_pipeline_stage(
    num_layers: int,
    num_virtual_layers_pre: int,
    num_virtual_layers_post: int,
    stage: PipelineStageInfo,
) -> tuple[int, int]:
    """Returns the global layer range ``[start, end)`` owned by ``stage``.

    The ``num_layers + pre + post`` virtual layers are spread evenly over the stages
    (the first ``V % P`` stages get one more); then the ``pre`` virtual layers are taken
    off the first stage and the ``post`` ones off the last stage, since those stages also
    run the embeddings and the head.

    Args:
        num_layers: Number of real transformer layers.
        num_virtual_layers_pre: Cost of the first stage's extra modules, in layers.
        num_virtual_layers_post: Cost of the last stage's extra modules, in layers.
        stage: The stage to compute the range for.

    Returns:
        ``(start, end_exclusive)`` as global layer indices.

    Raises:
        ValueError: If any stage would be left with no real layer.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_virtual_layers_pre < 0 or num_virtual_layers_post < 0:
        raise ValueError(
            "num_virtual_layers_pre/post must be >= 0, got "
            f"{num_virtual_layers_pre}/{num_virtual_layers_post}"
        )
    num_stages = stage.num_stages
    num_virtual = num_layers + num_virtual_layers_pre + num_virtual_layers_post
    base, extra = divmod(num_virtual, num_stages)
    counts = [base + (1 if s < extra else 0) for s in range(num_stages)]
    counts[0] -= num_virtual_layers_pre
    counts[-1] -= num_virtual_layers_post
    if min(counts) <= 0:
        raise ValueError(
            f"cannot split {num_layers} layers (+{num_virtual_layers_pre} pre, "
            f"+{num_virtual_layers_post} post virtual layers) over {num_stages} stages: "
            f"per-stage real layer counts would be {counts}"
        )
    start = sum(counts[: stage.current_stage])
    return start, start + counts[stage.current_stage]
