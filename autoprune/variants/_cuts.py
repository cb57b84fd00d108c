"""Sub-network cuts in the variant database: which heads or FFN channels a block keeps at a
width, and its consuming projection (``o_proj`` / ``down_proj``) on the kept inputs, corrected.

A cut, like a pruned layer, depends only on the block, the width, the structured method and the
calibration statistics, so it is the same in every plan: chosen and corrected once, then read by
every later process that cuts the model (Ray workers, a resumed search, ``refine``, ``export``).
Within a process :class:`autoprune.structure.CutCache` keeps them in memory and asks this store
on a miss. One checked file per cut (see :mod:`autoprune.variants._entry`), under
``<database>/cuts/block_<i>/<what>-<method>-<width...>.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autoprune.variants._entry import DatabaseCounters, read_counted, write_checked

CUTS_FOLDER = "cuts"
CUT_FORMAT = "cut-1"


class CutStore:
    """The cuts of one database (:class:`autoprune.structure.CutStore`): ``load`` a key's value, or
    None where absent or damaged (one warning line; the cut is recomputed and stored again)."""

    def __init__(self, root: Path, counters: DatabaseCounters) -> None:
        self.root = root
        self.counters = counters

    def path(self, key: tuple) -> Path:
        """The file of ``key``: (what, block, method, the width's numbers...)."""
        what, block, *rest = key
        return self.root / f"block_{block:03d}" / ("-".join(str(part) for part in (what, *rest)) + ".safetensors")

    def load(self, key: tuple) -> list[int] | torch.Tensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        found = read_counted(path, self.counters, "sub-network cut",
                             lambda tensors, metadata: metadata.get("format") == CUT_FORMAT and len(tensors) == 1)
        if found is None:
            return None
        tensors = found[0]
        return tensors["kept"].tolist() if "kept" in tensors else tensors["weight"]

    def save(self, key: tuple, value: list[int] | torch.Tensor) -> None:
        if isinstance(value, list):
            tensors = {"kept": torch.tensor(value, dtype=torch.int64)}
        else:
            tensors = {"weight": value.detach().to("cpu").contiguous()}
        path = self.path(key)
        self.counters.keep(self.root, path, lambda: write_checked(path, tensors, {"format": CUT_FORMAT}))
