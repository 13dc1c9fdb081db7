"""Re-measure a finished study's ε-sharpness cases with other solver settings.

For every (model, role, seed, ε, space) case of ``STUDY_DIR/sharpness.csv`` that has both an
``lbfgsb`` and an ``apgd`` value, the trained model is loaded from ``STUDY_DIR/runs`` (nothing is
retrained), each variant is run with the study's data, seed and protocol (10 iterations,
``bn="eval"``) and compared with the study's L-BFGS-B value (reached: within 1e-4 relative).

    sharpkit study --out /tmp/study                     # the default study
    python benchmarks/study_solvers.py /tmp/study      # apgd, pga, apgd x2 on all 80 cases

Prints one line per case (``*``: below L-BFGS-B) and, per variant and space, how many cases reached
the L-BFGS-B value and the worst shortfall.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

import sharpkit as sk
from sharpkit.study.pipeline import Study, default_config

VARIANTS = {
    "apgd": {"solver": "apgd"},
    "pga": {"solver": "pga"},
    "apgd x2": {"solver": "apgd", "restarts": 2},
    "apgd 20": {"solver": "apgd", "max_iter": 20},
}
REACHED_RTOL = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--variants", nargs="+", default=["apgd", "pga", "apgd x2"], choices=list(VARIANTS))
    parser.add_argument("--only-below", action="store_true", help="only the cases where the study's apgd was below")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the study's own measurements on a busy machine; results do not depend on it
    study = Study(default_config(), args.study_dir, progress=False)
    ref: dict[tuple, dict[str, float]] = {}
    with open(args.study_dir / "sharpness.csv") as fh:
        for r in csv.DictReader(fh):
            ref.setdefault((r["model"], r["role"], r["seed"], r["eps"], r["space"]), {})[r["solver"]] = float(r["value"])
    cases = [k for k, v in ref.items() if "lbfgsb" in v and "apgd" in v
             and (not args.only_below or v["apgd"] < v["lbfgsb"] * (1 - REACHED_RTOL))]
    models: dict[tuple, torch.nn.Module] = {}
    shortfall: dict[tuple[str, str], list[float]] = {}
    for key in cases:
        spec, role, seed, eps, space = key
        if (spec, role, seed) not in models:
            run_dir = study.run_dir(study.run_key(spec, role, int(seed)))
            if not (run_dir / "final.pt").exists():
                raise SystemExit(f"{run_dir} has no trained model: run the study first")
            models[spec, role, seed] = study.trained(study.run_key(spec, role, int(seed)))[0]
        sub = None if space == "full" else int(space.split("=")[1])
        target = ref[key]["lbfgsb"]
        cells = []
        for name in args.variants:
            r = sk.keskar_sharpness(models[spec, role, seed], study.loss_fn, study.sharp_xy, epsilon=float(eps),
                                    subspace_dim=sub, seed=1000 + int(seed), bn="eval", **VARIANTS[name])
            rel = r.value / target - 1 if target > 0 else 0.0
            shortfall.setdefault(("full" if sub is None else "subspace", name), []).append(rel)
            cells.append(f"{name}={r.value:.2f}{'' if rel >= -REACHED_RTOL else '*'}")
        print(f"{spec} {role} seed {seed} eps {eps} {space}: lbfgsb={target:.2f} " + " ".join(cells), flush=True)
    print(f"\nreached the study's L-BFGS-B value (to {REACHED_RTOL:g} relative), per space:")
    for (space, name), rels in sorted(shortfall.items()):
        reached = sum(r >= -REACHED_RTOL for r in rels)
        below1 = sum(r < -0.01 for r in rels)
        print(f"  {space:8} {name:8} {reached:3}/{len(rels)}   below by > 1 %: {below1:2}   worst {100 * min(rels):+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
