"""Packaging: every package src/ imports is declared in pyproject.toml, optional ones only
through ``terrasynth.extras.require`` (a missing extra is one line naming it), and
generation works with every optional package absent."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from terrasynth.errors import TerrasynthError
from terrasynth.extras import EXTRAS, MissingExtraError, require
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "terrasynth"
# import names of the optional packages (the extras' distributions)
OPTIONAL_MODULES = (
    "dask", "distributed", "lmdb", "bigearthnet_common", "pystac_client",
    "starlette", "uvicorn", "rio_tiler", "xstatic",
)  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9._-]+", req.strip()).group(0))


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        extra: {_requirement_name(r) for r in reqs}
        for extra, reqs in project["optional-dependencies"].items()
    }
    return core, extras


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports() -> tuple[dict[str, set[str]], dict[tuple[str, str], set[str]]]:
    """Third-party modules src/ imports: ``import`` statements (module -> files) and
    ``require(module, extra, ...)`` calls ((module, extra) -> files)."""
    stdlib = set(sys.stdlib_module_names)
    plain: dict[str, set[str]] = {}
    required: dict[tuple[str, str], set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", "") == "require"
                and len(node.args) >= 2
                and all(isinstance(a, ast.Constant) for a in node.args[:2])
            ):
                module, extra = node.args[0].value, node.args[1].value
                required.setdefault((module.split(".")[0], extra), set()).add(where)
                continue
            if getattr(node, "lineno", None) in skip:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top != "terrasynth":
                    plain.setdefault(top, set()).add(where)
    return plain, required


def _distributions(module: str) -> set[str]:
    """The installed distributions providing ``module`` (several for a namespace package
    split into parts, as pystac >= 1.15 is)."""
    dists = packages_distributions().get(module)
    assert dists, f"'{module}' is imported by src/ but no installed distribution provides it"
    return {_norm(d) for d in dists}


def test_every_imported_package_is_declared():
    core, extras = _declared()
    plain, required = _imports()
    assert {"affine", "scipy", "numpy", "rasterio", "torch", "xarray"} <= set(plain)
    missing = {
        m: sorted(files) for m, files in plain.items() if not _distributions(m) & core
    }  # an import statement runs wherever the module is used: a core dependency
    assert not missing, f"imported but not a core dependency in pyproject.toml: {missing}"
    assert {m for m, _ in required} >= {"distributed", "lmdb", "bigearthnet_common"}
    for (module, extra), files in required.items():
        assert extra in extras, f"{sorted(files)}: extra '{extra}' is not in pyproject.toml"
        assert _distributions(module) & extras[extra], (
            f"{sorted(files)}: require('{module}', '{extra}') but pyproject.toml's "
            f"'{extra}' extra does not list {sorted(_distributions(module))}"
        )


def test_optional_modules_are_never_imported_by_an_import_statement():
    plain, _ = _imports()
    assert not set(plain) & set(OPTIONAL_MODULES), {
        m: plain[m] for m in OPTIONAL_MODULES if m in plain
    }


def test_the_extras_table_matches_pyproject():
    _, extras = _declared()
    assert {e: set(map(_norm, p)) for e, p in EXTRAS.items()} == {e: extras[e] for e in EXTRAS}
    assert extras["all"] == {"terrasynth"}  # terrasynth[dask,lmdb,demo,stac]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = project["optional-dependencies"]["all"]
    assert set(spec[spec.index("[") + 1 : spec.index("]")].split(",")) == set(EXTRAS)
    # the project commands (scripts/setup.sh) install every extra the demo and tests need
    assert '-e "$root[dev,all]"' in (ROOT / "scripts" / "setup.sh").read_text()


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if absent
    with pytest.raises(MissingExtraError) as err:
        require("distributed", "dask", "whole scenes on Dask")
    assert isinstance(err.value, TerrasynthError)
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("pip install 'terrasynth[dask]'")
    assert "'distributed'" in msg and msg.startswith("whole scenes on Dask")


def test_dask_engine_without_dask_fails_before_any_work(monkeypatch, tmp_path):
    from terrasynth.scenes.engine import generate_scene, work_folder
    from terrasynth.scenes.job import JobSpec

    monkeypatch.setitem(sys.modules, "distributed", None)
    spec = JobSpec(inputs=[("s1grd", "unused.tif")], targets=["s2l2a"])
    with pytest.raises(MissingExtraError, match=r"pip install 'terrasynth\[dask\]'"):
        generate_scene(None, spec, tmp_path / "out", engine="dask")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() and not work_folder(tmp_path / "out").exists()


@pytest.mark.needs_data
def test_the_lmdb_reader_without_lmdb_names_the_extra(monkeypatch):
    from terrasynth.data.sources.bigearthnet_v2 import BigEarthNetV2Source

    source = BigEarthNetV2Source()
    path = str(DATA / "bigearthnet_v2_lmdb")
    assert source.detect(path)  # detection needs no LMDB
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'terrasynth\[lmdb\]'"):
        next(iter(source.scenes(path)))


# Run in a fresh interpreter in which every optional package fails to import.
BLOCKED = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


def _run_without_extras(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    script = BLOCKED.format(mods=OPTIONAL_MODULES) + code
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


def test_the_demo_without_its_extra_is_one_error_line(tmp_path):
    out = tmp_path / "demo"
    res = _run_without_extras(
        f"from terrasynth.cli.main import main\nmain(['demo', '-o', {str(out)!r}])"
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert "pip install 'terrasynth[demo]'" in res.stderr
    assert not out.exists()


@pytest.mark.needs_data
def test_every_module_imports_and_generate_runs_without_the_extras(s1_utm, tmp_path):
    out = tmp_path / "gen"
    code = (
        "import importlib, pkgutil, terrasynth\n"
        "for m in pkgutil.walk_packages(terrasynth.__path__, 'terrasynth.'):\n"
        "    importlib.import_module(m.name)\n"
        "from terrasynth.cli.main import main\n"
        f"main(['generate', '-i', 's1grd={s1_utm}', '-t', 'dem', '-n', '1', '--steps', '1',"
        f" '-o', {str(out)!r}])\n"
    )
    res = _run_without_extras(code)
    assert res.returncode == 0, res.stderr
    assert (out / "dem_sample0.tif").is_file() and (out / "generation.json").is_file()
