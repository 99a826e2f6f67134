"""Pruning (issue 5): unstructured magnitude pruning with masks that hold through training (per layer and global),
2:4 semi-structured sparsity and its conversion to torch's sparse tensor-core kernels, a gradual (cubic) pruning
schedule, and structured channel pruning that physically shrinks Conv / Linear layers and what follows them.

    from mltoolkit import pruning
    pruning.global_magnitude_prune(model, 0.5)          # masks; fine-tune as usual; zeros stay zeros
    print(pruning.sparsity_report(model))
    pruning.make_permanent(model)                       # bake the masks into plain weights
    small = pruning.channel_prune(model, 0.5, (x,))     # a smaller model: fewer channels, same forward code
"""
from mltoolkit.pruning.schedule import GradualPruner, cubic_sparsity
from mltoolkit.pruning.semi_structured import (
    SemiStructuredSummary,
    is_nm_sparse,
    nm_mask,
    nm_prune,
    semi_structured_prune,
    semi_structured_unsupported,
    to_semi_structured,
)
from mltoolkit.pruning.structured import (
    ChannelGroup,
    PruningError,
    channel_groups,
    channel_prune,
    count_parameters,
)
from mltoolkit.pruning.unstructured import (
    LayerSparsity,
    SparsityReport,
    WeightMask,
    get_mask,
    global_magnitude_prune,
    load_pruned_state_dict,
    magnitude_prune,
    make_permanent,
    remove,
    sparsity_report,
)

__all__ = ["magnitude_prune", "global_magnitude_prune", "make_permanent", "remove", "sparsity_report",
           "load_pruned_state_dict", "get_mask", "WeightMask", "SparsityReport", "LayerSparsity",
           "nm_mask", "nm_prune", "semi_structured_prune", "is_nm_sparse", "to_semi_structured",
           "semi_structured_unsupported", "SemiStructuredSummary", "GradualPruner", "cubic_sparsity",
           "channel_prune", "channel_groups", "ChannelGroup", "PruningError", "count_parameters"]
