"""Anchor Gram alignment: centred kernels, CKA, the consensus, and the anchor losses."""
from .gram import (GramConsensus, centre, centred_gram, centred_normalised, cka, feature_cka, from_upper_triangle,
                   n_from_upper, normalise, sub_kernel, upper_triangle)
from .losses import anchor_info_nce, cka_loss, paired_info_nce, two_view_contrastive

__all__ = [
    "GramConsensus", "centre", "centred_gram", "centred_normalised", "cka", "feature_cka", "from_upper_triangle",
    "n_from_upper", "normalise", "sub_kernel", "upper_triangle", "anchor_info_nce", "cka_loss", "paired_info_nce", "two_view_contrastive",
]
