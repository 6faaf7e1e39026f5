"""What makes a GeoTIFF cloud-optimised, checked from its bytes (for the tests).

GDAL's own checker (``validate_cloud_optimized_geotiff.py``) ships with GDAL's Python
bindings, which rasterio's wheels do not include, and rio-cogeo is not a dependency; so the
tests read the TIFF structure themselves and check the COG layout rules:

* GDAL's structural metadata right after the header says ``LAYOUT=IFDS_BEFORE_DATA`` and
  ``BLOCK_ORDER=ROW_MAJOR``;
* every image (full resolution, then each overview, each smaller than the one before) is
  tiled;
* all image file directories (IFDs) come before any tile data;
* tile data is stored smallest overview first, full resolution last, and within an image in
  increasing offsets (row-major).
"""

from __future__ import annotations

import struct
from pathlib import Path

TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # BYTE, SHORT, LONG, LONG8
WIDTH, HEIGHT, TILE_WIDTH, TILE_OFFSETS, TILE_BYTE_COUNTS = 256, 257, 322, 324, 325


def _ifds(data: bytes) -> list[tuple[int, dict[int, list[int]]]]:
    """(offset, {tag: values}) of every IFD in the chain, in file order of the chain."""
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(order + "H", data[2:4])[0] == 43
    off_fmt, count_fmt, entry = ("Q", "Q", 20) if big else ("I", "H", 12)
    off_size = 8 if big else 4
    pos = struct.unpack(order + off_fmt, data[8:16] if big else data[4:8])[0]
    out = []
    while pos:
        n = struct.unpack_from(order + count_fmt, data, pos)[0]
        start = pos + (8 if big else 2)
        tags: dict[int, list[int]] = {}
        for i in range(n):
            e = start + i * entry
            tag, typ = struct.unpack_from(order + "HH", data, e)
            count = struct.unpack_from(order + ("Q" if big else "I"), data, e + 4)[0]
            if typ not in TYPES:
                continue
            fmt, size = TYPES[typ]
            value_at = e + (12 if big else 8)
            if count * size > off_size:
                value_at = struct.unpack_from(order + off_fmt, data, value_at)[0]
            tags[tag] = list(struct.unpack_from(f"{order}{count}{fmt}", data, value_at))
        out.append((pos, tags))
        pos = struct.unpack_from(order + off_fmt, data, start + n * entry)[0]
    return out


def cog_problems(path: Path) -> list[str]:
    """Ways in which ``path`` breaks the COG layout rules above; empty if none."""
    data = Path(path).read_bytes()
    head = data[:1024]
    problems = []
    if b"GDAL_STRUCTURAL_METADATA_SIZE=" not in head:
        problems.append("no GDAL structural metadata after the header")
    for rule in (b"LAYOUT=IFDS_BEFORE_DATA", b"BLOCK_ORDER=ROW_MAJOR"):
        if rule not in head:
            problems.append(f"structural metadata lacks {rule.decode()}")
    ifds = _ifds(data)
    sizes = [(t[WIDTH][0], t[HEIGHT][0]) for _, t in ifds]
    if any(b[0] >= a[0] or b[1] >= a[1] for a, b in zip(sizes, sizes[1:], strict=False)):
        problems.append(f"images do not shrink level by level: {sizes}")
    if any(TILE_WIDTH not in t or TILE_OFFSETS not in t for _, t in ifds):
        problems.append("an image is not tiled")
        return problems
    data_offsets = [
        [o for o, n in zip(t[TILE_OFFSETS], t[TILE_BYTE_COUNTS], strict=True) if n] for _, t in ifds
    ]
    first_data = min(min(d) for d in data_offsets if d)
    if max(pos for pos, _ in ifds) > first_data:
        problems.append("an IFD lies after tile data")
    for level, offsets in enumerate(data_offsets):
        if offsets != sorted(offsets):
            problems.append(f"level {level}: tiles are not in increasing offsets")
    for level in range(len(data_offsets) - 1):
        bigger, smaller = data_offsets[level], data_offsets[level + 1]
        if bigger and smaller and min(bigger) < max(smaller):
            problems.append(f"level {level}'s data comes before the smaller level {level + 1}'s")
    return problems


def overview_count(path: Path) -> int:
    """Images in the file after the full-resolution one."""
    return len(_ifds(Path(path).read_bytes())) - 1
