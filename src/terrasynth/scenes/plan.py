"""The geometry of a whole-scene job: windows, tiles and the halo a tile needs.

Sampling a scene blends the x0 predictions of overlapping windows at every step
(``terrasynth.sampling.windows``). A pixel's blend depends only on the windows that cover
it, so the scene can be cut into tiles: a tile's next state needs the current state and the
conditions on the tile grown by one window (its *region*), and the windows that overlap
the tile. Tiles are then independent tasks within a step, and the result is the same as
sampling the scene in one piece (windows are placed on one global layout).
"""

from __future__ import annotations

from dataclasses import dataclass

from terrasynth.errors import TerrasynthError
from terrasynth.sampling.windows import window_offsets

TILE_STEP = 64  # tiles are a multiple of this many px (of every band-group factor)


def check_tile(tile: int, window: int) -> None:
    """Refuse a tile size that is not a multiple of :data:`TILE_STEP` px or smaller than
    the model's window (a user error: ``--tile``)."""
    if tile % TILE_STEP or tile < max(window, TILE_STEP):
        raise TerrasynthError(
            f"--tile must be a multiple of {TILE_STEP} px and at least the model's window "
            f"({window} px), not {tile}"
        )


@dataclass(frozen=True)
class Box:
    """A rectangle of base-grid pixels: rows ``row .. row+height``, cols ``col .. col+width``."""

    row: int
    col: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"{self.row}_{self.col}"

    def scaled(self, factor: int) -> tuple[slice, slice]:
        """Row and column slices of this box on a grid ``factor`` times coarser."""
        return (
            slice(self.row // factor, (self.row + self.height) // factor),
            slice(self.col // factor, (self.col + self.width) // factor),
        )


@dataclass(frozen=True)
class ScenePlan:
    """Windows of ``window`` px at ``stride`` over a ``height`` x ``width`` scene, cut into
    tiles of ``tile`` px (a multiple of every band-group factor)."""

    height: int
    width: int
    window: int
    stride: int
    tile: int = 256

    def __post_init__(self) -> None:
        if self.tile % TILE_STEP or self.tile < self.window:
            raise ValueError(f"tile size must be a multiple of {TILE_STEP} and >= {self.window}")

    @property
    def window_rows(self) -> list[int]:
        return window_offsets(self.height, self.window, self.stride)

    @property
    def window_cols(self) -> list[int]:
        return window_offsets(self.width, self.window, self.stride)

    @property
    def num_windows(self) -> int:
        return len(self.window_rows) * len(self.window_cols)

    def tiles(self) -> list[Box]:
        """Tiles in row-major order; the last row and column may be narrower."""
        return [
            Box(r, c, min(self.tile, self.height - r), min(self.tile, self.width - c))
            for r in range(0, self.height, self.tile)
            for c in range(0, self.width, self.tile)
        ]

    def region(self, tile: Box) -> Box:
        """The tile grown by one window on each side, inside the scene."""
        r0, c0 = max(0, tile.row - self.window), max(0, tile.col - self.window)
        r1 = min(self.height, tile.row + tile.height + self.window)
        c1 = min(self.width, tile.col + tile.width + self.window)
        return Box(r0, c0, r1 - r0, c1 - c0)

    def windows(self, tile: Box) -> list[tuple[int, int]]:
        """(row, col) of every window of the global layout that overlaps ``tile``."""
        rows = [r for r in self.window_rows if tile.row - self.window < r < tile.row + tile.height]
        cols = [c for c in self.window_cols if tile.col - self.window < c < tile.col + tile.width]
        return [(r, c) for r in rows for c in cols]

    def windows_per_step(self) -> int:
        """Model windows one step runs, counting the ones two tiles share twice."""
        return sum(len(self.windows(t)) for t in self.tiles())
