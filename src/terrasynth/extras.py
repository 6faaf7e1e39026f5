"""Optional dependencies: imported by the feature that needs them, with a clear error.

``pip install terrasynth`` gives generation, training and evaluation; a few features need
packages only some users want (installed with ``pip install 'terrasynth[EXTRA]'``):

=========  ============================  ===================================================
extra      package                       feature
=========  ============================  ===================================================
``dask``   ``dask``, ``distributed``     whole scenes on a Dask cluster (``--engine dask``),
                                         whole-scene results opened lazily in chunks
``lmdb``   ``lmdb``                      the BigEarthNet v2 LMDB reader
``demo``   ``bigearthnet-common``        ``terrasynth demo``: the real example patches it ships
``stac``   ``pystac-client``             STAC search: ``data fetch --stac``,
                                         ``generate --stac``
``serve``  ``starlette``, ``uvicorn``,   ``terrasynth serve``: the local map app
           ``rio-tiler``,
           ``xstatic-leaflet``
``all``    all of the above
=========  ============================  ===================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from terrasynth.errors import TerrasynthError

# extra -> its packages (pyproject.toml ``[project.optional-dependencies]``; the tests keep
# the two in step)
EXTRAS: dict[str, tuple[str, ...]] = {
    "dask": ("dask", "distributed"),
    "lmdb": ("lmdb",),
    "demo": ("bigearthnet-common",),
    "stac": ("pystac-client",),
    "serve": ("starlette", "uvicorn", "rio-tiler", "xstatic-leaflet"),
}


class MissingExtraError(TerrasynthError):
    """A feature needs an optional dependency that is not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``; if it is not installed, raise one line naming the
    extra that installs it: ``pip install 'terrasynth[EXTRA]'``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra '{extra}' (known: {', '.join(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            f"{feature}: needs the optional package '{exc.name or module}', which is not "
            f"installed: pip install 'terrasynth[{extra}]'"
        ) from exc
