"""``sharpkit study`` under torch.distributed (2 CPU processes, gloo): rank 0 trains, every rank
measures its share of the data, rank 0 writes the outputs; the numbers match a single-process run.

Kept apart from tests/test_distributed.py because it trains models (slow on a 2-core machine).
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from test_distributed import TIMEOUT, WORLD, finish, start, study_config, study_run

pytestmark = pytest.mark.slow

# The study's models are float32: sums over shards are added in another order than in one process.
RTOL = 1e-4


def _numbers(obj, path=""):
    """Every float in ``obj`` with its path (timings left out)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "seconds" not in str(k) and k not in ("key", "run_dir"):
                yield from _numbers(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}/{i}")
    elif isinstance(obj, float) and math.isfinite(obj):
        yield path, obj


def test_study_matches_single_process_and_rank0_writes(tmp_path):
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    dist_dir.mkdir()
    single_dir.mkdir()
    procs = start("study", dist_dir)
    deadline = time.monotonic() + 3 * TIMEOUT
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = study_run(single_dir)
    finally:
        torch.set_num_threads(threads)  # later tests train with the default thread count
    results = finish(procs, deadline, "distributed study")
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    assert "train" in results[0][1] and "train" not in results[1][1]  # progress on rank 0 only
    r0, r1 = (torch.load(dist_dir / f"study-rank{r}.pt", weights_only=False) for r in range(WORLD))
    a, b, ref = (dict(_numbers(r)) for r in (r0, r1, single))
    assert a == b  # every rank holds the same numbers
    assert set(a) == set(ref) and len(ref) > 50
    bad = {k: (a[k], ref[k]) for k in ref if abs(a[k] - ref[k]) > RTOL * max(abs(ref[k]), 1e-3)}
    assert not bad, bad
    out = dist_dir / "study"
    assert (out / "report.html").exists() and (out / "results.json").exists()
    assert not list(out.rglob(".*tmp*"))  # no half-written files left behind
