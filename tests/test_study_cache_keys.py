"""What the study's cache keys hold: a training made on another device, torch version or dtype is
not reused, a measurement of another sharpkit version is redone, results reused from another
environment are reported, and curves of other grids are not read as this one's."""
from __future__ import annotations

import pytest
import torch

import sharpkit
from sharpkit.study import pipeline
from sharpkit.study.pipeline import Study, run_study

from test_study import _tiny, api, npz  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def _small(npz, **over):
    base = dict(models=("f1",), seeds=(0,), eps=(1e-3,), solvers=("pga",), sweep_models=(), curve_points=2,
                max_epochs=2)
    return _tiny(npz, **{**base, **over})


@pytest.mark.parametrize("field, other", [("device", "cuda"), ("torch", "2.0.0+cu118"), ("dtype", ["float64"])])
def test_trainings_of_another_device_torch_or_dtype_are_not_reused(field, other, tmp_path, npz, api, monkeypatch):
    """The training keys held neither the device nor torch's version nor the dtype: a folder of
    trainings made on a GPU (other floats, other models after tens of epochs) was read by a CPU run
    as its own, all 2 of 2 trainings reused."""
    out = tmp_path / "study"
    real_env = getattr(pipeline, "training_environment", lambda device: {})
    real_dtypes = getattr(Study, "param_dtypes", None)
    # (raising=False: on a sharpkit without these hooks the test runs, and fails on the reuse)
    if field == "dtype":
        monkeypatch.setattr(Study, "param_dtypes", lambda self, spec: other, raising=False)
    else:
        monkeypatch.setattr(pipeline, "training_environment", lambda device: {**real_env(device), field: other},
                            raising=False)
    elsewhere = Study(_small(npz), out, progress=False).run()["stats"]
    monkeypatch.setattr(pipeline, "training_environment", real_env, raising=False)
    monkeypatch.setattr(Study, "param_dtypes", real_dtypes, raising=False)
    here = Study(_small(npz), out, progress=False).run()["stats"]
    assert elsewhere["trainings_run"] == 2
    assert here["trainings_run"] == 2 and here["trainings_reused"] == 0
    assert here["measurements_reused"] == 0  # (each measured the models of its own environment)


def test_measurements_of_another_sharpkit_are_redone_and_mixed_provenance_is_reported(tmp_path, npz, api,
                                                                                      monkeypatch):
    """Trainings are reused across sharpkit versions (TRAINING_CODE keys them), measurements are
    not; the report says that its trainings came from another version and another CPU."""
    out = tmp_path / "study"
    real = getattr(pipeline, "provenance", lambda device: {})  # (getattr: see above)
    monkeypatch.setattr(pipeline, "__version__", "0.0.9")
    monkeypatch.setattr(pipeline, "provenance", lambda device: {**real(device), "sharpkit": "0.0.9",
                                                                   "device_name": "another CPU"}, raising=False)
    old = run_study(_small(npz), out, progress=False, threads=1)
    monkeypatch.setattr(pipeline, "__version__", sharpkit.__version__)
    monkeypatch.setattr(pipeline, "provenance", real, raising=False)
    new = run_study(_small(npz), out, progress=False, threads=1)
    assert new["stats"]["trainings_run"] == 0 and new["stats"]["trainings_reused"] == 2
    assert new["stats"]["measurements_reused"] == 0 and new["stats"]["measurements_run"] == old["stats"]["measurements_run"]
    assert old["provenance"]["mixed"] is False
    prov = new["provenance"]
    assert prov["mixed"] is True
    assert [(e["provenance"]["sharpkit"], e["provenance"]["device_name"], e["count"]) for e in prov["trainings"]] == [
        ("0.0.9", "another CPU", 2)]
    assert {e["provenance"]["sharpkit"] for e in prov["measurements"]} == {sharpkit.__version__}
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "not all made in this run's environment" in page and "2 × sharpkit 0.0.9" in page
    again = run_study(_small(npz), out, progress=False, threads=1)  # the trainings are still the old ones
    assert again["provenance"]["mixed"] is True and again["stats"]["measurements_run"] == 0


def test_tracking_does_not_change_the_trained_model(tmp_path, npz, api, monkeypatch):
    """A measurement along training that draws from torch's global RNG shifted the dropout masks of
    every later epoch: the tracked training of c1 ended at other weights than the untracked one.
    The study reuses a tracked run for an untracked request, so they must be the same training."""
    real = api.eigenvalues

    def drawing(H, **kwargs):
        torch.rand(7)  # an estimator free to use the global RNG
        return real(H, **kwargs)

    monkeypatch.setattr(sharpkit, "eigenvalues", drawing)
    study = Study(_small(npz, models=("c1",)), tmp_path / "s", progress=False)
    tracked, plain = study.train_key("c1", 8, 0, track=True), study.train_key("c1", 8, 0)
    m_tracked, rec = study.trained(tracked)
    m_plain, _ = study.trained(plain)
    assert any("lambda_max" in h for h in rec["history"])
    for (name, a), b in zip(m_tracked.state_dict().items(), m_plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_curves_and_slices_of_another_grid_are_not_reused(tmp_path, npz, api):
    """The curve keys held the number of points, not the grid: 5 and 7 curve points both make 7
    alphas (0 and 1 added to the first), and the 7-point study showed the 5-point curve; the slices
    of 4 and 5 points (5 steps each, 0 added to the first) likewise."""
    out = tmp_path / "study"

    def curves(points):
        m = Study(_small(npz, curve_points=points), out, progress=False).run()["models"]["f1"]
        return m["curves"]["linear"]["train"]["alphas"], m["slices"]["sb"]["alphas"]

    assert curves(5) == ([-1.0, -0.25, 0.0, 0.5, 1.0, 1.25, 2.0], [-1.0, -0.5, 0.0, 0.5, 1.0])
    alphas, steps = curves(7)
    assert alphas == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0] and steps == pytest.approx([-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1])
    alphas, steps = curves(4)
    assert alphas == [-1.0, 0.0, 1.0, 2.0] and steps == pytest.approx([-1.0, -1 / 3, 0.0, 1 / 3, 1.0])


def test_study_files_hold_only_globals_every_supported_torch_loads(tmp_path, npz, api):
    """The study stored ``torch.__version__`` itself, a ``TorchVersion``: torch 2.5 refuses that global
    under ``weights_only=True``, so the audit commands the study prints failed on every checkpoint
    it had written ("Unsupported global: GLOBAL torch.torch_version.TorchVersion")."""
    import zipfile

    out = tmp_path / "study"
    Study(_small(npz), out, progress=False).run()
    files = sorted(out.rglob("*.pt"))
    assert files
    for path in files:
        with zipfile.ZipFile(path) as z:
            pickled = b"".join(z.read(name) for name in z.namelist() if name.endswith(".pkl"))
        assert b"torch_version" not in pickled, path
        torch.load(path, weights_only=True)
