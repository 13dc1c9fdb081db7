"""Per-seed results are reused whatever the order or the set of seeds: the runs that the seed
list's order or membership changed were trained (and measured) again."""
from __future__ import annotations

import pytest

from sharpkit.study.pipeline import Study

from test_study import _tiny, api, npz  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def _run(npz, out, seeds, **over):
    base = dict(models=("f1",), seeds=seeds, eps=(1e-3,), solvers=("pga",), curve_points=2, max_epochs=2,
                sweep=(8, 32), warm_epochs=(1,))
    return Study(_tiny(npz, **{**base, **over}), out, progress=False).run()


def test_seeds_in_another_order_reuse_every_run(tmp_path, npz, api):
    """--seeds 1,0 after --seeds 0,1 trained all 5 runs again (the first listed seed was the tracked
    one, and tracking is in the training key) and measured everything again."""
    out = tmp_path / "study"
    first = _run(npz, out, (0, 1))
    again = _run(npz, out, (1, 0))
    assert first["stats"]["trainings_run"] == 5  # 2 seeds x (SB, LB) and a warm start
    assert again["stats"]["trainings_run"] == 0 and again["stats"]["measurements_run"] == 0
    a, b = first["models"]["f1"], again["models"]["f1"]
    assert a["representative_seed"] == b["representative_seed"] == 0
    assert sorted((r["seed"], r["role"], r["key"]) for r in b["runs"]) == sorted((r["seed"], r["role"], r["key"]) for r in a["runs"])
    assert [w["k"] for w in b["warm_start"]] == [0, 1]


def test_a_tracked_run_serves_the_same_training_untracked(tmp_path, npz, api):
    """--seeds 0,1,2 after --seeds 1,2: seed 1 is no longer the tracked one, and its two runs were
    trained again untracked (4 trainings); they are the same trainings, observed more, and are now
    reused (2 trainings: seed 0's).  Likewise a warm-start list shortened from 1,2 to 1 trained the
    SB run again for its smaller set of snapshots, and the warm start from it."""
    out = tmp_path / "study"
    _run(npz, out, (1, 2), sweep_models=())
    more = _run(npz, out, (0, 1, 2), sweep_models=())
    assert more["stats"]["trainings_run"] == 2 and more["stats"]["trainings_reused"] == 4
    runs = {(r["seed"], r["role"]): r for r in more["models"]["f1"]["runs"]}
    assert "tracking" in runs[(0, "sb")] and "tracking" not in runs[(1, "sb")]
    # Fewer warm starts need fewer snapshots: the SB run that keeps more serves.
    out2 = tmp_path / "study2"
    _run(npz, out2, (0,), warm_epochs=(1, 2))
    fewer = _run(npz, out2, (0,), warm_epochs=(1,))
    assert fewer["stats"]["trainings_run"] == 0
