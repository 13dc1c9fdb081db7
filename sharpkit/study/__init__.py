"""The large-batch versus small-batch study (Keskar et al. 2017) behind ``sharpkit study``.

- :mod:`.models`: F1-style MLP, C1-style 1-D conv net, ``module:factory`` resolution.
- :mod:`.train`: Adam training until the training loss stops improving, resumable checkpoints.
- :mod:`.noise_scale`: the gradient noise scale B_simple (McCandlish et al. 2018).
- :mod:`.pipeline`: the study itself (trainings, measurements, sweeps, cache and resume).
- :mod:`.report`: tables, figures, verdicts, ``report.html``.
- :mod:`.cli`: the ``sharpkit study`` subcommand.
"""
from __future__ import annotations

from .models import build_model, make_c1, make_f1

__all__ = ["build_model", "make_f1", "make_c1"]
