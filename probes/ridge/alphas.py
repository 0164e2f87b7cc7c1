"""The alpha grid of a ridge probe: :data:`DEFAULT_ALPHAS` and :func:`parse_alphas`. Light on
purpose (numpy only): ``FitConfig`` and ``fastprobe --help`` import it without torch."""
from __future__ import annotations

import numpy as np

from probes.errors import RidgeError

__all__ = ["DEFAULT_ALPHAS", "parse_alphas"]

# 12 decades at ~3.3 alphas per decade. The top must reach past the activations' own scale:
# alpha competes with the Gram's eigenvalues, which grow with the squared activation norm, and
# Gemma-3-270M's deep layers (norms in the thousands) chose alphas of 1e6-1e8; an older grid
# topped at 1e5 there left its deep layers under-regularised (world places test R² 0.52 -> 0.57,
# films 0.00 -> 0.18 with this grid, issue 17), and SmolLM2's deep layers sat at its edge too.
DEFAULT_ALPHAS = "1e-2:1e10:41"


def parse_alphas(spec) -> np.ndarray:
    """The alpha grid as a float64 array.

    Parameters
    ----------
    spec : str or sequence of float
        ``"LO:HI:N"`` (N log-spaced values from LO to HI inclusive), a comma list
        ``"0.1,1,10"``, or any sequence of numbers.

    Returns
    -------
    numpy.ndarray
        (A,) float64; RidgeError unless every alpha is finite and > 0.
    """
    if isinstance(spec, str):
        alphas = _parse_string(spec)
    else:
        alphas = np.atleast_1d(np.asarray(spec, dtype=np.float64)).ravel()
    if alphas.size == 0:
        raise RidgeError("alpha grid is empty")
    if not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise RidgeError(f"alphas must be finite and > 0, got {alphas.tolist()}")
    return alphas.astype(np.float64)


def _parse_string(spec: str) -> np.ndarray:
    s = spec.strip()
    try:
        if ":" not in s:
            return np.array([float(v) for v in s.split(",") if v.strip()])
        parts = s.split(":")
        if len(parts) != 3:
            raise ValueError
        lo, hi, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise RidgeError(f"alpha grid {spec!r}: expected LO:HI:N (e.g. 1e-2:1e10:41) or a "
                         "comma-separated list of numbers") from None
    if lo <= 0 or hi <= 0 or num < 1:
        raise RidgeError(f"alpha grid {spec!r}: LO and HI must be > 0 and N >= 1")
    return np.logspace(np.log10(lo), np.log10(hi), num)
