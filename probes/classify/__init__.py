"""Classification probes for many layers at once (issue 15): class labels and stratified folds
(``labels``), L2-regularised logistic regression batched over layers and C values with the C
chosen by stratified k-fold (``logistic``, ``select``), the closed-form difference-of-means and
shrinkage-LDA probes (``closed_form``) and classification metrics (``metrics``). Names resolve
lazily: importing the package loads neither torch nor scikit-learn."""
from __future__ import annotations

from actstore.lazy import lazy_exports

__all__: list[str] = []

_LAZY: dict[str, str] = {}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
