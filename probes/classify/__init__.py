"""Classification probes for many layers at once (issue 15): class labels and stratified folds
(``labels``), L2-regularised logistic regression batched over layers and C values with the C
chosen by stratified k-fold (``logistic``, ``select``), the closed-form difference-of-means and
shrinkage-LDA probes from streamed class statistics (``closed_form``; the shrinkage chosen by
k-fold in ``shrinkage_cv``), classification metrics (``metrics``) and the scikit-learn estimators
``LogisticProbeCV`` and ``MassMeanProbe`` (``estimator``). Names resolve lazily: importing the
package loads neither torch nor scikit-learn."""
from __future__ import annotations

from actstore.lazy import lazy_exports

_LAZY: dict[str, str] = {
    **{name: "closed_form" for name in ("ClassStats", "FourthMoments", "LinearProbe",
                                        "mass_mean", "lda", "lda_grid", "class_stats")},
    **{name: "metrics" for name in ("confusion_matrix", "accuracy", "balanced_accuracy",
                                    "macro_f1", "auroc", "log_loss",
                                    "evaluate_classification")},
    "ShrinkageCV": "shrinkage_cv",
    **{name: "labels" for name in ("Labels", "encode_labels", "stratified_folds")},
    **{name: "logistic" for name in ("LogisticPath", "fit_logistic_path", "balanced_weights",
                                     "decision_function", "predict_proba")},
    "LogisticCV": "select", "select_c": "select",
    "LogisticProbeCV": "estimator", "MassMeanProbe": "estimator",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
