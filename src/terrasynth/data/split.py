"""Spatially separated train/val/test splits: whole blocks of ground go to one split.

Blocks are squares of ``block_size_m`` metres on an equirectangular approximation of the
globe (independent of each source's CRS), so the same place seen by two sources, or on two
dates, lands in the same split. A block's split comes from a hash of its index and the seed:
deterministic, order-independent and reproducible from the numbers stored with the store.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("train", "val", "test")
METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class SplitConfig:
    """How chips are assigned to splits; stored with the store so splits reproduce."""

    block_size_m: float = 2560.0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0

    def block_of(self, lon: float, lat: float) -> tuple[int, int]:
        """Index of the block holding (lon, lat)."""
        y = lat * METRES_PER_DEGREE
        x = lon * METRES_PER_DEGREE * math.cos(math.radians(lat))
        return (math.floor(x / self.block_size_m), math.floor(y / self.block_size_m))

    def split_of_block(self, block: tuple[int, int]) -> str:
        digest = hashlib.sha256(f"{self.seed}:{block[0]}:{block[1]}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        for name, frac in zip(SPLITS, self.fractions, strict=True):
            edge += frac
            if u < edge:
                return name
        return SPLITS[-1]

    def to_dict(self) -> dict[str, object]:
        return {
            "block_size_m": self.block_size_m,
            "fractions": list(self.fractions),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SplitConfig:
        return cls(float(d["block_size_m"]), tuple(d["fractions"]), int(d["seed"]))
