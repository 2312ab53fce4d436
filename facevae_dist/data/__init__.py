"""Data layer: sources of raw faces -> WebDataset shards -> a distributed uint8 loader (see contracts)."""

from facevae_dist.data.loader import ShardLoader, read_sizes, to_float
from facevae_dist.data.masks import FACE_EXCLUDED_LABELS, labelmap_to_mask
from facevae_dist.data.shards import ShardOptions, build_shards, read_manifest, shards_info, verify_shards
from facevae_dist.data.sources import SOURCES, Source, make_source

__all__ = [
    "FACE_EXCLUDED_LABELS", "SOURCES", "ShardLoader", "ShardOptions", "Source", "build_shards", "labelmap_to_mask",
    "make_source", "read_manifest", "read_sizes", "shards_info", "to_float", "verify_shards",
]
