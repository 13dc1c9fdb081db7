"""ε-sharpness solvers on a large-batch-trained F1-style MLP, and the subspace variant's memory.

Script mode (``python benchmarks/bench_sharpness.py``) prints two tables:

1. Solvers.  An F1-style MLP (40 -> 5 x [512, BN, ReLU] -> 10, about 1.07M parameters) is trained on
   MNIST-1D (4000 training sequences) with Adam at batch 400 (10 % of the training set, Keskar's
   large batch) until the epoch loss stops improving; the weights are cached under
   ``$SHARPKIT_CACHE`` (default ``~/.cache/sharpkit``).  The reference is the paper's protocol,
   ``solver="lbfgsb"`` with 10 iterations.  Then ``lbfgsb``, ``pga``, ``apgd``, ``apgd`` with
   two starts (``restarts=2``: the gradient and the sign first step) and ``apgd`` with bfloat16
   steps (``ascent_dtype="bfloat16"``; its value is known exactly only at the end of the call, so its
   time to reach is the whole call's) run in interleaved
   rounds (the order rotates each round) and the table gives, as medians over rounds, the time each
   takes to first reach the reference value (from the start of the call, setup included), its total
   time and final value.
2. Memory (``--memory``, run in a fresh subprocess): the subspace variant with p = 100 on an MLP of
   about 10⁷ parameters; the peak resident memory above the baseline after building the model and
   data, in units of one n-vector (4n bytes).

3. Survey (``--survey``, instead of 1 and 2): how often each ascent reaches the paper-protocol value.
   Eight MNIST-1D models (F1-style MLPs and C1-style conv nets, batch 400 and 50, several seeds and
   training lengths, some narrower) at ε = 1e-3 and 5e-4; per case the final values of ``lbfgsb``
   (10 iterations), ``apgd`` from the gradient and from the sign first step, ``apgd`` with both
   starts (``restarts=2``), ``pga`` and ``apgd`` with bfloat16 steps, and the evaluations each
   needed to reach the ``lbfgsb`` value (``-`` never); then each call's seconds (single runs, not
   interleaved: indicative only).

4. Data sources (``--small-batches``, instead of 1 and 2): the time of ``apgd`` and ``lbfgsb`` on
   untrained F1-style MLPs (widths 128 and 512) with the data as one batch, as a list of batches of
   128 and as a DataLoader of batches of 128.

``--quick`` trains less and runs fewer rounds (a smoke test).  ``--skip-memory`` omits table 2.
``--device cuda`` runs the solver table with the model on the GPU (training stays on the CPU, cached).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
from torch import nn

import sharpkit as sk
from sharpkit.data import _cache_dir
from sharpkit.study.models import make_f1
from sharpkit.files import atomic_torch_save
from sharpkit.study.train import TrainConfig, train

# Table rows: label -> keskar_sharpness arguments.  "apgd x2" is two runs, from the gradient and
# the sign first step (restarts=2); "apgd bf16" takes its steps under bfloat16 autocast (its value,
# and so its history, is exact only at the end: the time to reach is then the whole call's).
SOLVERS = {"lbfgsb": {"solver": "lbfgsb"}, "pga": {"solver": "pga"}, "apgd": {"solver": "apgd"},
           "apgd x2": {"solver": "apgd", "restarts": 2},
           "apgd bf16": {"solver": "apgd", "ascent_dtype": "bfloat16"}}


def trained_f1(data, batch_size: int, max_epochs: int, seed: int = 0) -> nn.Module:
    """The F1-style MLP trained with Adam at ``batch_size`` until its loss plateaus (cached)."""
    torch.manual_seed(seed)
    model = make_f1((40,), 10)
    path = _cache_dir() / f"bench_sharpness_f1_b{batch_size}_e{max_epochs}_s{seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        t = time.perf_counter()
        res = train(model, nn.CrossEntropyLoss(), data.train, TrainConfig(batch_size=batch_size, max_epochs=max_epochs,
                                                                         patience=10), seed=seed)
        print(f"trained F1 at batch {batch_size}: {res.epochs} epochs ({res.stopped}), final epoch loss "
              f"{res.history[-1]['train_loss']:.4g}, {time.perf_counter() - t:.0f} s", file=sys.stderr)
        atomic_torch_save(model.state_dict(), path)
    return model.eval()


def time_to_reach(history, target: float) -> float:
    """Seconds until the best value first reached ``target`` (inf if never)."""
    for _, t, v in history:
        if v >= target:
            return t
    return float("inf")


def evals_to_reach(history, target: float) -> int | None:
    """Evaluations until the best value first reached ``target`` (None if never)."""
    for evals, _, v in history:
        if v >= target:
            return evals
    return None


def solver_table(rounds: int, epsilon: float, max_epochs: int, device: str = "cpu") -> None:
    torch.manual_seed(0)
    data = sk.load_mnist1d()
    model = trained_f1(data, batch_size=len(data.x_train) // 10, max_epochs=max_epochs).to(device)
    loss_fn = nn.CrossEntropyLoss()
    n = sk.FlatParams(model).n
    ref = sk.keskar_sharpness(model, loss_fn, data.train, epsilon=epsilon, solver="lbfgsb", max_iter=10,
                              device=device)
    target = ref.value
    print(f"F1-style MLP, n = {n}, MNIST-1D train ({len(data.x_train)} samples), epsilon = {epsilon:g}, "
          f"loss = {ref.loss:.5g}; reference (lbfgsb, 10 iterations): {target:.5g} "
          f"[{ref.info['nit']} iterations, {ref.info['nfev']} evaluations]; torch threads {torch.get_num_threads()}; "
          f"device {torch.cuda.get_device_name(device) if torch.device(device).type == 'cuda' else 'cpu'}")
    runs: dict[str, list] = {s: [] for s in SOLVERS}
    labels = list(SOLVERS)
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for s in order:
            res = sk.keskar_sharpness(model, loss_fn, data.train, epsilon=epsilon, max_iter=10, device=device,
                                      **SOLVERS[s])
            own_final = res.value if s == "lbfgsb" else target
            runs[s].append((time_to_reach(res.history, min(target, own_final)), res.time_s, res.value, res.num_evals,
                            time_to_reach(res.history, target)))
    med = {s: statistics.median(x[0] for x in runs[s]) for s in SOLVERS}
    print(f"\nmedians over {rounds} interleaved rounds (time to the reference value from the call's start)")
    print(f"{'solver':8} {'t_reach_s':>10} {'speedup':>8} {'total_s':>8} {'value':>10} {'evals':>6} {'reached':>8}")
    for s in SOLVERS:
        xs = runs[s]
        reached = sum(1 for x in xs if x[4] < float("inf"))
        print(f"{s:8} {med[s]:10.3f} {med['lbfgsb'] / med[s]:8.2f} {statistics.median(x[1] for x in xs):8.3f} "
              f"{statistics.median(x[2] for x in xs):10.5g} {statistics.median(x[3] for x in xs):6.0f} "
              f"{reached:>4}/{len(xs)}")


# (model, training batch, epochs, seed, width, training samples): trained on the first samples of
# MNIST-1D's training split and measured on them.
SURVEY_MODELS = [("f1", 400, 20, 0, 512, 4000), ("f1", 400, 200, 0, 512, 4000), ("f1", 400, 20, 1, 512, 4000),
                 ("f1", 50, 10, 0, 512, 4000), ("f1", 400, 60, 3, 512, 4000), ("f1", 200, 20, 0, 256, 2000),
                 ("c1", 400, 30, 0, 0, 4000), ("c1", 50, 10, 0, 0, 4000)]
SURVEY_RUNS = {"apgd": {"solver": "apgd"}, "apgd sign": {"solver": "apgd", "first_step": "sign"},
               "apgd x2": {"solver": "apgd", "restarts": 2}, "pga": {"solver": "pga"},
               "apgd bf16": {"solver": "apgd", "ascent_dtype": "bfloat16"}}


def survey(epsilons: tuple[float, ...]) -> None:
    from sharpkit.study.models import make_c1

    data = sk.load_mnist1d()
    loss_fn = nn.CrossEntropyLoss()
    print(f"{'model':34} {'eps':>7} {'lbfgsb':>9} " + " ".join(f"{k:>15}" for k in SURVEY_RUNS))
    tally = {k: 0 for k in SURVEY_RUNS}
    cases = 0
    times: list[tuple[str, dict[str, float]]] = []
    for kind, batch, epochs, seed, width, samples in SURVEY_MODELS:
        x, y = data.x_train[:samples], data.y_train[:samples]
        torch.manual_seed(seed)
        model = make_f1((40,), 10, width=width) if kind == "f1" else make_c1((40,), 10)
        path = _cache_dir() / f"bench_sharpness_survey_{kind}{width}_n{samples}_b{batch}_e{epochs}_s{seed}.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            train(model, loss_fn, (x, y), TrainConfig(batch_size=batch, max_epochs=epochs, patience=10), seed=seed)
            atomic_torch_save(model.state_dict(), path)
        model.eval()
        label = f"{kind}{'-' + str(width) if kind == 'f1' else ''} n={samples} b={batch} e={epochs} s={seed}"
        for eps in epsilons:
            ref = sk.keskar_sharpness(model, loss_fn, (x, y), epsilon=eps, solver="lbfgsb")
            cells = []
            seconds = {"lbfgsb": ref.time_s}
            for name, kw in SURVEY_RUNS.items():
                r = sk.keskar_sharpness(model, loss_fn, (x, y), epsilon=eps, **kw)
                reach = evals_to_reach(r.history, ref.value)
                tally[name] += r.value >= ref.value
                cells.append(f"{r.value:9.1f} @{'-' if reach is None else reach:>3}")
                seconds[name] = r.time_s
            cases += 1
            times.append((f"{label} {eps:.0e}", seconds))
            print(f"{label:34} {eps:7.0e} {ref.value:9.1f} " + " ".join(f"{c:>15}" for c in cells), flush=True)
    print(f"\nvalue >= lbfgsb's in {cases} cases: " + ", ".join(f"{k} {v}" for k, v in tally.items()))
    print("(@: evaluations until the best value reached lbfgsb's; lbfgsb itself takes 11)")
    print(f"\nseconds per call (single runs, in the order above; threads {torch.get_num_threads()})")
    names = ["lbfgsb", *SURVEY_RUNS]
    print(f"{'case':42} " + " ".join(f"{k:>9}" for k in names))
    for case, seconds in times:
        print(f"{case:42} " + " ".join(f"{seconds[k]:9.2f}" for k in names))


def small_batches_table(rounds: int, epsilon: float) -> None:
    """The same measurement with the data as one batch, as a list of batches of 128 and as a
    DataLoader of batches of 128 (the objective joins small batches into larger passes)."""
    data = sk.load_mnist1d()
    x, y = data.train
    loss_fn = nn.CrossEntropyLoss()
    sources = {"one batch": (x, y), "list of 128": [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)],
               "DataLoader 128": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)}
    print(f"\nε-sharpness (ε = {epsilon:g}) of untrained F1-style MLPs on {len(x)} MNIST-1D samples by data source; "
          f"medians of {rounds} interleaved rounds, seconds per call")
    print(f"{'width':>5} {'params':>8} {'solver':7} " + " ".join(f"{k:>15}" for k in sources))
    for width in (128, 512):
        torch.manual_seed(0)
        model = make_f1((40,), 10, width=width).eval()
        n = sk.FlatParams(model).n
        for solver in ("apgd", "lbfgsb"):
            times: dict[str, list[float]] = {k: [] for k in sources}
            values = {}
            for _ in range(rounds):
                for name, src in sources.items():
                    t = time.perf_counter()
                    r = sk.keskar_sharpness(model, loss_fn, src, epsilon=epsilon, solver=solver)
                    times[name].append(time.perf_counter() - t)
                    values[name] = r.value
            spread = max(values.values()) / min(values.values()) - 1
            print(f"{width:>5} {n:>8} {solver:7} " + " ".join(f"{statistics.median(v):15.3f}" for v in times.values())
                  + f"   values agree to {spread:.1e}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(width: int, p: int, samples: int, max_iter: int) -> dict:
    """Runs in a fresh process: peak RSS of the subspace variant above the post-setup baseline."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    data = sk.load_mnist1d()
    x, y = data.x_train[:samples], data.y_train[:samples]
    n = sk.FlatParams(model).n
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is a process-wide high-water mark that setup (data generation) may already have
    # set higher than the call ever reaches, so the call's peak is sampled from /proc while it runs
    # (torch releases the GIL in its kernels, so the sampler keeps running).
    sampled = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled[0] = max(sampled[0], _rss_bytes())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    res = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x, y), epsilon=1e-3, subspace_dim=p, solver="apgd",
                              max_iter=max_iter)
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    peak = max(sampled[0], _rss_bytes())
    return {"n": n, "p": p, "samples": samples, "max_iter": max_iter, "num_evals": res.num_evals,
            "baseline_bytes": base, "peak_before_bytes": peak_before, "peak_bytes": peak, "seconds": seconds,
            "value": res.value, "n_vector_bytes": 4 * n}


def memory_table(width: int, p: int, samples: int, max_iter: int) -> None:
    cmd = [sys.executable, __file__, "--memory-child", json.dumps([width, p, samples, max_iter])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    delta = r["peak_bytes"] - r["baseline_bytes"]
    unit = r["n_vector_bytes"]
    print(f"\nsubspace variant, n = {r['n']} parameters, p = {r['p']}, {r['samples']} samples, apgd "
          f"max_iter = {r['max_iter']} ({r['num_evals']} evaluations), {r['seconds']:.1f} s, value {r['value']:.4g}")
    print(f"peak RSS during the call (sampled every 0.2 ms) above the RSS before it: {delta / 2**20:.0f} MiB = "
          f"{delta / unit:.2f} n-vectors (one n-vector = {unit / 2**20:.1f} MiB; a stored A would be "
          f"{r['p']} n-vectors; the model's parameters are 1 n-vector, already in the baseline)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--width", type=int, default=3150, help="hidden width of the memory model (3150: ~1.0e7 parameters)")
    ap.add_argument("--memory-iters", type=int, default=1)
    ap.add_argument("--memory-samples", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="where the model runs for the solver table (cpu, cuda)")
    ap.add_argument("--survey", action="store_true", help="the survey table only (values, no times)")
    ap.add_argument("--small-batches", action="store_true",
                    help="only the table of data sources: one batch, batches of 128, a DataLoader")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*json.loads(args.memory_child))))
        return
    if args.survey:
        survey((1e-3, 5e-4))
        return
    if args.small_batches:
        small_batches_table(args.rounds, args.epsilon)
        return
    if args.quick:
        args.rounds, args.max_epochs, args.width = 2, 20, 1000
    if not args.memory_only:
        solver_table(args.rounds, args.epsilon, args.max_epochs, args.device)
    if not args.skip_memory:
        memory_table(args.width, 100, args.memory_samples, args.memory_iters)


if __name__ == "__main__":
    main()
