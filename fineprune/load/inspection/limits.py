"""How much one model file may declare: every bound the checks enforce, in one place.

A hostile file is small and declares a lot (a 69 KB archive asking for a 12 GiB kernel, a
1.9 GiB dataset that exists only as a fill value, 43,000 layers), so each bound is checked
against what the file declares, before anything is read or built.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3

WEIGHT_COPIES = 8
"""Bytes a sanitize job holds per byte of weights at its peak (the file's bytes, the delivered
model, the pruned clone, the model being tuned with its gradients and Adam's two slots...).
`bench/budget_bench.py` measured 6.1 (peak resident memory over weight bytes, Dense models of 32
and 128 MiB) and a model at this budget sanitizes under the RLIMIT_DATA it gives; 8 leaves room
for the heap RLIMIT_DATA counts beyond resident memory."""
JOB_RESERVE_BYTES = 1 * GiB
"""Heap a job needs besides the weights: TensorFlow itself (0.5 GiB), the data, the report."""
MIN_WEIGHT_BYTES = 64 * MiB
"""The weight budget never drops below this, whatever the memory: a small model must load."""


def weight_budget(memory_bytes: int) -> int:
    """Weight bytes a job with `memory_bytes` of heap can sanitize."""
    return max(MIN_WEIGHT_BYTES, (memory_bytes - JOB_RESERVE_BYTES) // WEIGHT_COPIES)


@dataclass(frozen=True)
class Limits:
    """The bounds on one model file; anything above one is refused, naming the bound."""

    weight_bytes: int = weight_budget(8 * GiB)
    """Bytes of all weights, from the config's layers or the weights file's datasets."""
    layers: int = 2_000
    """Layers in all, nested models and wrapped layers included (ResNet-152: 517)."""
    nesting: int = 8
    """Models and wrappers inside one another."""
    config_bytes: int = 16 * MiB
    config_depth: int = 200
    """JSON nesting of the config."""
    asset_members: int = 256
    """Files under assets/ (lookup layers keep a vocabulary there)."""
    asset_bytes: int = 64 * MiB
    compression_ratio: int = 200
    """Largest uncompressed/compressed ratio of a zip member (deflate tops out near 1030)."""
    ratio_floor_bytes: int = MiB
    """Members smaller than this are too small to be a bomb, whatever their ratio."""
    hdf5_objects: int = 20_000
    """Links in an HDF5 file (groups and datasets), hard links to one object counted each."""
    hdf5_depth: int = 32
    """Groups inside one another (Keras nests a few per model level)."""
    hdf5_attributes: int = 20_000
    """Attributes in all; one object may have at most `hdf5_object_attributes`."""
    hdf5_object_attributes: int = 64
    attribute_bytes: int = 64 * 1024
    """Stored size of a fixed-size attribute (HDF5 keeps compact ones under 64 KiB)."""
    name_chars: int = 255
    """Length of a layer name, a weight name, an attribute string in a list."""
    hdf5_overhead_bytes: int = 64 * MiB
    """Room in a weights file for HDF5's own metadata, on top of the weights."""

    @classmethod
    def for_memory(cls, memory_bytes: int) -> Limits:
        """Limits whose weight budget fits a process that may use `memory_bytes` of heap."""
        return cls(weight_bytes=weight_budget(memory_bytes))

    @classmethod
    def for_this_process(cls) -> Limits:
        """The budget of the memory this process may use: its RLIMIT_DATA, else the machine's."""
        soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
        if soft in (resource.RLIM_INFINITY, -1) or soft <= 0:
            try:
                soft = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                return cls()
        return cls.for_memory(int(soft))

    @property
    def weights_file_bytes(self) -> int:
        """Size of the archive's weights file: the weights plus HDF5's own metadata."""
        return self.weight_bytes + self.hdf5_overhead_bytes

    @property
    def uncompressed_bytes(self) -> int:
        """All members of an archive together, as Keras would read or extract them."""
        return self.weights_file_bytes + self.asset_bytes + 2 * self.config_bytes

    @property
    def zip_members(self) -> int:
        """config.json, metadata.json, model.weights.h5, the assets and their folders."""
        return 3 + 2 * self.asset_members
