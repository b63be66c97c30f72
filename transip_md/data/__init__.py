"""Data layer: labelled structures (:class:`Frame`), file I/O, splits and batching.

Reference-data generation with xTB lives in :mod:`transip_md.data.generate` and is not
imported here, so that training and export code does not pull in tblite.
"""

from .frames import Frame, frame_from_atoms, frame_to_atoms
from .readers import read_frames, write_frames
from .splits import batches_by_atoms, split_frames

__all__ = [
    "Frame",
    "frame_from_atoms",
    "frame_to_atoms",
    "read_frames",
    "write_frames",
    "split_frames",
    "batches_by_atoms",
]
