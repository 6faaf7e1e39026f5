"""Whole-scene jobs: same arrays as in-memory sampling, resumable, refusing bad jobs."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import rasterio

from terrasynth import __version__
from terrasynth.atomic import locked_folder
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.pipeline import Pipeline, default_model_path
from terrasynth.scenes.engine import generate_scene, run_local, work_folder
from terrasynth.scenes.job import JobSpec, SceneJob

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained()


def spec_for(path, **kw) -> JobSpec:
    base = dict(targets=["s2l2a"], num_samples=2, seed=5, steps=3, tile=64, batch_size=16)
    return JobSpec(inputs=[("s1grd", str(path))], **{**base, **kw})


def test_tiles_give_the_same_scene_as_sampling_it_in_one_piece(pipe, s1_utm, tmp_path):
    files = generate_scene(pipe, spec_for(s1_utm), tmp_path / "out")
    names = {p.name for p in files}
    assert {"s2l2a_sample0.tif", "s2l2a_sample1.tif", "s2l2a_mean.tif"} <= names
    mem = pipe.generate({"s1grd": s1_utm}, ["s2l2a"], num_samples=2, seed=5, steps=3)
    with rasterio.open(s1_utm) as src:
        grid = (src.crs, src.transform, src.width, src.height)
    for k in range(2):
        with rasterio.open(tmp_path / "out" / f"s2l2a_sample{k}.tif") as f:
            assert (f.crs, f.transform, f.width, f.height) == grid
            streamed = f.read()
        # the 10 m bands (coarser groups are replicated, not interpolated, when streamed:
        # the same field, apart where it jumps within a 20 or 60 m pixel)
        np.testing.assert_allclose(streamed[:4], mem["s2l2a"].samples[k][:4], atol=1e-5)
        coarse = np.abs(streamed[4:] - mem["s2l2a"].samples[k][4:])
        assert coarse.mean() < 0.01 and coarse.max() < 0.5, (coarse.mean(), coarse.max())
    assert not work_folder(tmp_path / "out").exists()  # the state is removed when done


def test_an_interrupted_job_resumes_without_redoing_finished_tiles(pipe, s1_utm, tmp_path):
    full = generate_scene(pipe, spec_for(s1_utm, eta=0.5), tmp_path / "full")
    assert full
    job = SceneJob(pipe, spec_for(s1_utm, eta=0.5), tmp_path / "job.work").open()
    total = len(job.phases()) * len(job.tiles())

    def stop_after(phase, done, total_):
        if done == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_local(job, stop_after)
    job = SceneJob(pipe, spec_for(s1_utm, eta=0.5), tmp_path / "job.work").open()
    left = sum(len(job.pending(p)) for p in job.phases())
    assert left == total - 7
    ran = []
    run_local(job, lambda phase, done, total_: ran.append(phase))
    assert len(ran) == left
    out = tmp_path / "resumed"
    generate_scene(pipe, spec_for(s1_utm, eta=0.5), out)  # a fresh job: compare the arrays
    for name in ("s2l2a_sample0.tif", "s2l2a_sample1.tif"):
        a = rasterio.open(tmp_path / "full" / name).read()
        b = rasterio.open(out / name).read()
        assert np.array_equal(a, b)
    final = job.store["final/s2l2a/r10m"][:]
    fresh = SceneJob(pipe, spec_for(s1_utm, eta=0.5), tmp_path / "other.work").open()
    run_local(fresh)
    assert np.array_equal(final, fresh.store["final/s2l2a/r10m"][:])


def test_a_work_folder_of_another_job_is_not_resumed(pipe, s1_utm, tmp_path):
    SceneJob(pipe, spec_for(s1_utm), tmp_path / "w").open()
    with pytest.raises(TerrasynthError, match="different job"):
        SceneJob(pipe, spec_for(s1_utm, seed=6), tmp_path / "w").open()
    SceneJob(pipe, spec_for(s1_utm, seed=6), tmp_path / "w").open(overwrite=True)


def test_bad_jobs_are_refused_before_any_work(pipe, s1_utm, tmp_path):
    with pytest.raises(InputError, match="one value per scene"):
        SceneJob(pipe, spec_for(s1_utm, targets=["location"]), tmp_path / "a")
    with pytest.raises(TerrasynthError, match="cannot generate"):
        SceneJob(pipe, spec_for(s1_utm, targets=["nonsense"]), tmp_path / "b")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(s1_utm.read_bytes()[:3000])
    with pytest.raises(InputError, match="broken.tif"):
        SceneJob(pipe, spec_for(broken), tmp_path / "c")
    with pytest.raises(InputError, match="needs a place"):
        SceneJob(pipe, JobSpec(inputs=[], targets=["dem"], size=64), tmp_path / "d")
    with pytest.raises(TerrasynthError, match="--tile must be a multiple of 64"):
        SceneJob(pipe, spec_for(s1_utm, tile=100), tmp_path / "e")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_joint_generation_at_a_place(pipe, tmp_path):
    spec = JobSpec(inputs=[], targets=["dem"], size=96, gsd=30.0, location=(11.35, 46.5),
                   num_samples=1, steps=2, tile=64)  # fmt: skip
    generate_scene(pipe, spec, tmp_path / "joint")
    with rasterio.open(tmp_path / "joint" / "dem_sample0.tif") as f:
        assert f.crs.to_epsg() == 32632 and (f.width, f.height) == (96, 96)
        assert abs(f.transform.a - 30.0) < 1e-9
        assert np.isfinite(f.read()).all()


def test_a_cascade_refines_a_coarse_level_and_its_tiles_agree(pipe, s1_utm, tmp_path):
    import torch

    from terrasynth.scenes.engine import work_folder

    spec = spec_for(s1_utm, num_samples=1, cascade=20.0, cascade_start=0.5)
    fine = SceneJob(pipe, spec, work_folder(tmp_path / "o"))
    coarse = SceneJob(pipe, spec_for(s1_utm, num_samples=1), tmp_path / "c",
                      grid=fine.work.scaled(2)).open()  # fmt: skip
    run_local(coarse)
    assert coarse.gsd == pytest.approx(20.0)
    job = SceneJob(pipe, spec, tmp_path / "f", parent=coarse).open()
    assert job.cascade_factor == 2 and job.sampler.timesteps()[0] == pytest.approx(0.5)
    whole = torch.nn.functional.interpolate(
        torch.from_numpy(coarse.store["final/s2l2a/r10m"][:]), scale_factor=2, mode="bilinear"
    )
    part = job._parent("s2l2a", "r10m", slice(16, 64), slice(32, 96))
    np.testing.assert_allclose(part.numpy(), whole[..., 16:64, 32:96].numpy(), atol=1e-6)
    files = generate_scene(pipe, spec, tmp_path / "o")
    info = (tmp_path / "o" / "generation.json").read_text()
    assert '"factor": 2' in info and any(p.name == "s2l2a_sample0.tif" for p in files)
    with pytest.raises(InputError, match="cascade"):
        SceneJob(pipe, spec, tmp_path / "g", parent=job)  # same GSD: not a coarser level


def test_a_work_folder_is_not_resumed_with_other_weights(s1_utm, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    SceneJob(Pipeline.from_pretrained(model), spec_for(s1_utm), tmp_path / "w").open()
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3  # retrained in place: same folder, other weights
    save_file(weights, model / "model.safetensors")
    with pytest.raises(TerrasynthError, match="different job"):
        SceneJob(Pipeline.from_pretrained(model), spec_for(s1_utm), tmp_path / "w").open()


def test_a_work_folder_is_not_resumed_after_the_model_is_calibrated_again(s1_utm, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    SceneJob(Pipeline.from_pretrained(model), spec_for(s1_utm), tmp_path / "w").open()
    config = json.loads((model / "config.json").read_text())
    config["spread_scale"] = {"s2l2a": 0.5}  # what terrasynth calibrate rewrites in place
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(TerrasynthError, match="different job"):
        SceneJob(Pipeline.from_pretrained(model), spec_for(s1_utm), tmp_path / "w").open()


def test_a_work_folder_is_not_resumed_in_another_precision(s1_utm, tmp_path):
    pipe = Pipeline.from_pretrained().set_precision("bfloat16")
    job = SceneJob(pipe, spec_for(s1_utm), tmp_path / "w").open()
    assert job.signature()["precision"] == "bfloat16"
    with pytest.raises(TerrasynthError, match="different job"):
        SceneJob(pipe.set_precision("float32"), spec_for(s1_utm), tmp_path / "w").open()


def test_generation_json_records_versions_and_the_weights_hash(pipe, s1_utm, tmp_path):
    weights = default_model_path() / "model.safetensors"
    expected = {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    generate_scene(pipe, spec_for(s1_utm, num_samples=1, steps=1), tmp_path / "whole")
    mem = pipe.generate({"s1grd": s1_utm}, ["dem"], num_samples=1, steps=1)
    mem.save(tmp_path / "mem")
    for out in ("whole", "mem"):
        info = json.loads((tmp_path / out / "generation.json").read_text())
        assert info["weights_sha256"] == expected
        assert set(info["versions"]) == {"terrasynth", "torch", "numpy", "rasterio", "zarr", "gdal"}
        assert info["config_sha256"] == pipe.config_sha256
        assert info["versions"]["terrasynth"] == __version__


def test_a_second_run_on_the_same_work_folder_is_refused(pipe, s1_utm, tmp_path):
    out = tmp_path / "out"
    refused = pytest.raises(TerrasynthError, match="another terrasynth run")
    with locked_folder(work_folder(out)), refused:  # a first run holds it, still working
        generate_scene(pipe, spec_for(s1_utm), out)
    assert not out.exists()
