"""Landscape curves and slices under torch.distributed (2 gloo ranks, test_distributed's launcher):
whether sharding keeps the batches whole (``batches_stay_whole``: a forward of up to 64 rows and a
collective) is decided once per curve or slice, not at every point, and the values match the
single-process ones.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from test_distributed import RTOL, TIMEOUT, WORLD, finish, make_data, make_model, start  # the distributed launcher

HERE = Path(__file__).resolve()

ALPHAS = [0.0, 0.5, 1.5]
BETAS = [-0.5, 0.5]


def curves() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every curve and slice on one ``(X, Y)`` pair, with a model whose samples are independent
    (the pair is split by rows) and one whose samples interact (the pair stays whole on rank 0);
    and how many times each call asked ``batches_stay_whole``."""
    import sharpkit.landscape as landscape
    import sharpkit.objective as objective  # (the landscape's Objective asks it)

    calls = {"n": 0}
    answers: dict[str, bool] = {}
    probe = objective.batches_stay_whole

    def counting(*args, **kwargs):
        calls["n"] += 1
        answers[kind] = probe(*args, **kwargs)
        return answers[kind]

    objective.batches_stay_whole = counting
    try:
        out: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        loss_fn = nn.CrossEntropyLoss()
        pair = make_data()
        for kind, centered in (("independent", False), ("mixing", True)):
            a, b = make_model(seed=1, centered=centered), make_model(seed=7, centered=centered)
            runs = {
                "interpolate": lambda: landscape.interpolate(a, b, loss_fn, pair, alphas=ALPHAS, bn="eval"),
                "interpolate_sin": lambda: landscape.interpolate(a, b, loss_fn, pair, alphas=ALPHAS, path="sin"),
                "slice_1d": lambda: landscape.slice_1d(a, loss_fn, pair, alphas=ALPHAS, seed=3),
                "slice_2d": lambda: landscape.slice_2d(a, loss_fn, pair, alphas=ALPHAS, betas=BETAS, seed=3),
                "evaluate": lambda: landscape.evaluate(a, loss_fn, pair),
            }
            for name, run in runs.items():
                before = calls["n"]
                got = run()
                counts[f"{kind}/{name}"] = calls["n"] - before
                if isinstance(got, tuple):
                    out[f"{kind}/{name}"] = torch.tensor(got, dtype=torch.float64)
                else:
                    out[f"{kind}/{name}/loss"] = torch.as_tensor(got.loss, dtype=torch.float64)
                    out[f"{kind}/{name}/accuracy"] = torch.as_tensor(got.accuracy, dtype=torch.float64)
        counts.update({f"{kind}/keeps_batches": int(keep) for kind, keep in answers.items()})
        return out, counts
    finally:
        objective.batches_stay_whole = probe


def test_split_probe_runs_once_per_curve_and_values_match_single_process(tmp_path):
    procs = start("curves", tmp_path, script=HERE)
    deadline = time.monotonic() + TIMEOUT
    single, single_counts = curves()  # meanwhile, the single-process reference
    results = finish(procs, deadline, "scenario 'curves'")
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    assert single_counts == {key: 0 for key in single_counts}, single_counts  # (no process group: no probe)
    got = [torch.load(tmp_path / f"curves-rank{r}.pt") for r in range(WORLD)]
    for r in range(WORLD):
        counts = got[r]["counts"]
        # One probe per public call; the pair is split by rows for the independent samples only.
        assert counts.pop("independent/keeps_batches") == 0 and counts.pop("mixing/keeps_batches") == 1
        assert counts == {key: 1 for key in single_counts}, f"rank {r}: batches_stay_whole calls per call {counts}"
    bad = []
    for key, ref in single.items():
        a = got[0]["values"][key]
        if not torch.equal(a, got[1]["values"][key]):
            bad.append(f"{key}: ranks disagree")
        err = (a - ref).abs().max().item()
        if not err <= RTOL * max(ref.abs().max().item(), 1e-12):
            bad.append(f"{key}: distributed {a.tolist()} vs single-process {ref.tolist()}")
    assert not bad, "\n".join(bad)
    assert set(got[0]["values"]) == set(single)


def _worker(scenario: str, tmp: Path) -> None:
    torch.set_num_threads(1)
    from sharpkit.distributed import barrier, get_rank, init_distributed

    init_distributed(timeout=60)
    assert scenario == "curves", scenario
    values, counts = curves()
    torch.save({"values": values, "counts": counts}, tmp / f"{scenario}-rank{get_rank()}.pt")
    barrier()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
