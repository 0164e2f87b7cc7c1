"""Nonlinear probe: a one-hidden-layer MLP (torch, the paper's protocol) against the ridge probe
at one layer, both scored on the same rows."""
from __future__ import annotations

import math
import time
from functools import partial

import numpy as np

from probes.errors import ExperimentError
from probes.experiments.base import Experiment, RunContext, StepPlan
from probes.experiments.common import (
    add_store_arguments,
    as_store,
    csv_list,
    layer_fields,
    layer_x,
    num,
    probe_at,
    pyplot,
    summary,
)
from probes.inputs import parse_split, target_matrix
from probes.kernels import resolve
from probes.report import md_num, md_table, text_table

__all__ = ["nonlinear_experiment", "DEFAULT_WEIGHT_DECAYS", "EXPERIMENT"]

DEFAULT_WEIGHT_DECAYS = (0.01, 0.03, 0.1, 0.3)       # the paper's MLP grid


# ----------------------------------------------------------------------------- training

def _train_mlp(Xf, Yf, Xv, Yv, hidden, wd, lr, batch_size, max_epochs, patience, seed, device):
    """One MLP (d -> hidden ReLU -> k), AdamW, minibatches, early stopping on validation MSE.

    A non-finite validation loss (divergence) counts as +inf: never the best epoch.
    Returns (model at its best validation epoch, best val loss, epochs run, val loss curve);
    when no epoch had a finite validation loss (diverged): (None, inf, epochs, curve)."""
    # deferred: torch is heavy and only this experiment trains with it
    import torch
    torch.manual_seed(seed)
    d, k = Xf.shape[1], Yf.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, k)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad, curve = math.inf, None, 0, []
    nf = Xf.shape[0]
    for _ in range(max_epochs):
        net.train()
        order = torch.randperm(nf, generator=gen).to(device)
        for s in range(0, nf, batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(Xf[idx]), Yf[idx])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float(torch.nn.functional.mse_loss(net(Xv), Yv))
        curve.append(v)
        if not math.isfinite(v):
            v = math.inf                  # diverged (NaN / inf): never the best epoch
        if v < best - 1e-12:
            best, bad = v, 0
            best_state = {k_: t.detach().clone() for k_, t in net.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is None:
        return None, math.inf, len(curve), curve
    net.load_state_dict(best_state)
    return net, best, len(curve), curve


def _check_options(hidden, max_epochs, patience, batch_size, val_frac, weight_decays) -> list:
    """The weight decays as floats; ExperimentError for an option out of range."""
    if int(hidden) < 1 or int(max_epochs) < 1 or int(patience) < 1 or int(batch_size) < 1:
        raise ExperimentError("hidden, max_epochs, patience and batch_size must be >= 1")
    if not 0 < float(val_frac) < 1:
        raise ExperimentError(f"val_frac must be in (0, 1), got {val_frac!r}")
    wds = [float(w) for w in weight_decays]
    if not wds or any(not math.isfinite(w) or w < 0 for w in wds):
        raise ExperimentError(f"weight_decays must be a non-empty list of numbers >= 0, got {wds}")
    return wds


def _split_train(is_test, val_frac, seed):
    """(validation rows, fitting rows): a seeded random ``val_frac`` of the train rows."""
    tr = np.nonzero(~is_test)[0]
    perm = np.random.default_rng(seed).permutation(tr)
    n_val = max(1, int(round(float(val_frac) * len(tr))))
    val, fit_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(fit_rows) < 2:
        raise ExperimentError(f"{len(tr)} train rows leave {len(fit_rows)} to fit the MLP on")
    return val, fit_rows


def _train_all(Xs, Ys, fi, vi, wds, opts: dict, seed, dev):
    """One MLP per weight decay; (runs, (best net, its val loss, its weight decay) or None).
    ``opts``: hidden, lr, batch_size, max_epochs, patience."""
    # deferred: torch is heavy and only this experiment trains with it
    import torch
    runs, best = [], None
    # Tiny minibatch GEMMs are dominated by thread start-up and spinning: train them
    # single-threaded (bench/RESULTS.md, "Measurements moved out of code comments").
    threads = torch.get_num_threads()
    small = dev.type == "cpu" and opts["batch_size"] * (Xs.shape[1] + Ys.shape[1]) \
        * opts["hidden"] < 4e6
    if small:
        torch.set_num_threads(1)
    try:
        for wd in wds:
            net, v, ep, curve = _train_mlp(Xs[fi], Ys[fi], Xs[vi], Ys[vi], opts["hidden"], wd,
                                           opts["lr"], opts["batch_size"], opts["max_epochs"],
                                           opts["patience"], seed, dev)
            diverged = net is None
            runs.append({"weight_decay": wd, "best_val_mse": None if diverged else v,
                         "epochs": ep, "val_curve": curve, "diverged": diverged})
            if not diverged and (best is None or v < best[1]):
                best = (net, v, wd)
    finally:
        if small:
            torch.set_num_threads(threads)
    return runs, best


def _mlp_predictions(X, Y, fit_rows, val, wds, opts, seed, backend, device):
    """Standardise on the fitting rows, train one MLP per weight decay, predict every row
    (target units). Returns (predictions, runs, chosen weight decay, device)."""
    # deferred: torch is heavy and only this experiment trains with it
    import torch
    mx, sx = X[fit_rows].mean(0), X[fit_rows].std(0)
    sx = np.where(sx > 0, sx, 1.0)
    my, sy = Y[fit_rows].mean(0), Y[fit_rows].std(0)
    if np.any(sy == 0):
        raise ExperimentError("a target is constant on the MLP's fitting rows")
    _, dev = resolve(backend, device)
    Xs = torch.as_tensor((X - mx) / sx, dtype=torch.float32, device=dev)
    Ys = torch.as_tensor((Y - my) / sy, dtype=torch.float32, device=dev)
    runs, best = _train_all(Xs, Ys, torch.as_tensor(fit_rows, device=dev),
                            torch.as_tensor(val, device=dev), wds, opts, seed, dev)
    if best is None:
        raise ExperimentError(
            f"the MLP probe diverged (validation loss NaN or inf in every epoch) for every weight "
            f"decay {wds} at lr {opts['lr']:g}; lower the learning rate (--lr)")
    with torch.no_grad():
        P = best[0](Xs).double().cpu().numpy() * sy + my
    return P, runs, best[2], dev


# ----------------------------------------------------------------------------- compute

def nonlinear_experiment(store, layer=None, targets=None, hidden=256, seed=0,
                         weight_decays=DEFAULT_WEIGHT_DECAYS, lr=1e-3, batch_size=128,
                         max_epochs=100, patience=3, val_frac=0.2, alphas=None,
                         backend="auto", split="is_test", device=None) -> dict:
    """A one-hidden-layer MLP probe against the linear (ridge) probe at one layer.

    Linear: ridge on the train rows of ``split``, alpha by LOO (as ``fastprobe fit``). MLP (the
    paper's protocol): a seeded random ``val_frac`` of the train rows validates, the rest fit;
    inputs standardised and targets z-scored with the fitting rows' statistics; per weight
    decay Linear(d, hidden) -> ReLU -> Linear(hidden, k) trained by AdamW on shuffled MSE
    minibatches, stopped after ``patience`` epochs without validation improvement, keeping the
    best epoch; the lowest validation MSE wins (no refit). A weight decay whose every epoch
    diverges (NaN/inf) is recorded with ``"diverged": true`` and skipped. Deterministic for a
    seed on one machine (float32).

    Parameters
    ----------
    store : ActivationStore or path
        The store.
    layer : int, optional
        Hidden-state index (default: the best LOO layer of all layers).
    targets : str or list of str, optional
        Target columns (default: the store's own).
    hidden, seed, weight_decays, lr, batch_size, max_epochs, patience, val_frac
        The MLP: hidden ReLU units, seed (split, init, order), AdamW weight decays tried and
        learning rate, minibatch rows, epoch cap, early-stopping patience, validation fraction.
    alphas : str or sequence of float, optional
        Ridge alpha grid (default: :data:`probes.ridge.DEFAULT_ALPHAS`).
    backend : str
        Statistics backend of the layer fits.
    split : str
        Train/test split spec (:func:`probes.inputs.parse_split`).
    device : {"cpu", "cuda"}, optional
        Where the MLP trains (default: as the backend resolves).

    Returns
    -------
    dict
        ``experiment`` "nonlinear", ``linear`` and ``mlp`` (each with ``train`` and ``test``
        metrics; ``mlp["runs"]`` per weight decay); every field in docs/experiments.md.

    Raises
    ------
    ExperimentError
        An option out of range, a constant target, or every weight decay diverged.
    """
    t0 = time.perf_counter()
    store = as_store(store)
    names, Y = target_matrix(store, targets)
    n = Y.shape[0]
    wds = _check_options(hidden, max_epochs, patience, batch_size, val_frac, weight_decays)
    res, j = probe_at(store, names, alphas, split, backend, layer)
    chosen_layer = res["layers"][j]["layer"]
    is_test = parse_split(split, store, n)
    P_lin = res["arrays"]["predictions"][j]
    val, fit_rows = _split_train(is_test, val_frac, seed)
    opts = {"hidden": int(hidden), "lr": float(lr), "batch_size": int(batch_size),
            "max_epochs": int(max_epochs), "patience": int(patience)}
    P_mlp, runs, wd, dev = _mlp_predictions(layer_x(store, chosen_layer), Y, fit_rows, val, wds,
                                            opts, seed, backend, device)
    trm = ~is_test
    return {
        "experiment": "nonlinear", "name": "nonlinear",
        "store": str(store.path), "targets": names, "split": split, "n_rows": n,
        "n_train": int(trm.sum()), "n_test": int(is_test.sum()),
        **layer_fields(store, chosen_layer, layer),
        "linear": {"alpha": res["layers"][j]["alpha"],
                   "train": summary(Y[trm], P_lin[trm], names),
                   "test": summary(Y[is_test], P_lin[is_test], names)},
        "mlp": {"hidden": opts["hidden"], "weight_decay": wd, "lr": opts["lr"],
                "batch_size": opts["batch_size"], "max_epochs": opts["max_epochs"],
                "patience": opts["patience"], "n_fit": len(fit_rows), "n_val": len(val),
                "seed": int(seed), "device": str(dev), "runs": runs,
                "train": summary(Y[trm], P_mlp[trm], names),
                "test": summary(Y[is_test], P_mlp[is_test], names)},
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- outputs

def _probe_names(result: dict) -> tuple:
    m = result["mlp"]
    return ((f"linear (alpha {result['linear']['alpha']:.3g})", "linear"),
            (f"MLP {m['hidden']} (wd {m['weight_decay']:g})", "mlp"))


def text(result: dict) -> list[str]:
    """Both probes' train/test metrics, and each weight decay's validation MSE."""
    out = [f"nonlinear probe  targets {','.join(result['targets'])}  layer {result['layer']} "
           f"({result['layer_choice']})  train {result['n_train']} / test "
           f"{result['n_test']} ({result['split']})"]
    out += text_table(["probe", "train R2", "test R2", "spearman", "prox err"], [
        [name, num(result[key]["train"]["r2"]), num(result[key]["test"]["r2"]),
         num(result[key]["test"]["spearman"]), num(result[key]["test"]["proximity_error"])]
        for name, key in _probe_names(result)])
    out.append("MLP weight decays: " + ", ".join(
        f"{r['weight_decay']:g}: " + ("diverged" if r.get("diverged") else
                                      f"val MSE {num(r['best_val_mse'], '.4f')}")
        + f" ({r['epochs']} epochs)" for r in result["mlp"]["runs"]))
    return out


def plot(result: dict):
    """Test metrics of both probes, and the MLP's validation curves."""
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    ms = ["r2", "spearman", "proximity_error"]
    x = np.arange(len(ms))
    a1.bar(x - 0.2, [result["linear"]["test"][m] for m in ms], 0.4, label="linear (ridge)")
    a1.bar(x + 0.2, [result["mlp"]["test"][m] for m in ms], 0.4,
           label=f"MLP ({result['mlp']['hidden']} ReLU)")
    a1.set_xticks(x, ["test R²", "test spearman", "test prox. error"])
    a1.set_title(f"layer {result['layer']}")
    a1.grid(alpha=0.3, axis="y")
    a1.legend()
    for r in result["mlp"]["runs"]:
        a2.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], "o-", ms=3,
                label=f"wd {r['weight_decay']:g}")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation MSE (z units)")
    a2.set_title(f"MLP training (chosen wd {result['mlp']['weight_decay']:g})")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    return fig


def markdown(res: dict) -> list[str]:
    """Both probes' train and test metrics."""
    lin, m = res["linear"], res["mlp"]
    return [f"Layer {res['layer']}:", ""] + md_table(
        ["probe", "train R²", "test R²", "Spearman", "proximity error"],
        [[f"linear (ridge, alpha {lin['alpha']:.3g})",
          md_num(lin["train"]["r2"]), md_num(lin["test"]["r2"]),
          md_num(lin["test"]["spearman"]), md_num(lin["test"]["proximity_error"])],
         [f"MLP {m['hidden']} ReLU (weight decay {m['weight_decay']:g})",
          md_num(m["train"]["r2"]), md_num(m["test"]["r2"]), md_num(m["test"]["spearman"]),
          md_num(m["test"]["proximity_error"])]])


# ----------------------------------------------------------------------------- CLI and pipeline

EPILOG = """\
examples:
  fastprobe experiment nonlinear w.zarr --out exp
  fastprobe experiment nonlinear w.zarr --layer 12 --weight-decays 0.01,0.1 --max-epochs 50 --out exp
"""  # noqa: E501  (the example's command line, kept whole)


def add_arguments(p) -> None:
    add_store_arguments(p)
    p.add_argument("--hidden", type=int, default=256, help="hidden ReLU units (default 256)")
    p.add_argument("--weight-decays", default=",".join(map(str, DEFAULT_WEIGHT_DECAYS)),
                   metavar="W,...", help="AdamW weight decays tried; best validation loss wins "
                                         "(default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch rows (128)")
    p.add_argument("--max-epochs", type=int, default=100, help="epoch cap (100)")
    p.add_argument("--patience", type=int, default=3,
                   help="epochs without validation improvement before stopping (3)")
    p.add_argument("--val-frac", type=float, default=0.2,
                   help="fraction of the train rows used for validation (0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed (split, init, order)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where the MLP trains (default: cuda if the backend or a present "
                        "GPU says so)")


def from_args(args, common: dict) -> dict:
    return nonlinear_experiment(
        args.store, layer=args.layer, hidden=args.hidden, seed=args.seed,
        weight_decays=csv_list(args.weight_decays, float, "--weight-decays"), lr=args.lr,
        batch_size=args.batch_size, max_epochs=args.max_epochs, patience=args.patience,
        val_frac=args.val_frac, device=args.device, **common)


def plan(ctx: RunContext) -> StepPlan:
    """At the main fit's best layer, on the run's device."""
    return StepPlan({"layer": ctx.layer}, partial(nonlinear_experiment, ctx.store, layer=ctx.layer,
                                                  backend=ctx.backend, device=ctx.device))


EXPERIMENT = Experiment(
    key="nonlinear", kind="nonlinear", title="Nonlinear (MLP) probe vs linear",
    help="MLP probe (256 ReLU units) vs the linear probe at one layer", epilog=EPILOG,
    compute=nonlinear_experiment, add_arguments=add_arguments, from_args=from_args, plan=plan,
    text=text, plot=plot, markdown=markdown)
