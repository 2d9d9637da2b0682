"""Does another calibration fit earn a place over the single temperature `mri-edge calibrate`
fits by NLL? Decided on the run's held-out (validation) split only; test is printed after.

- temperature fitted by NLL (what calibrate does) against temperature chosen to minimise ECE:
  ECE on the left-out fold of 5-fold cross-validation inside the held-out split, repeated;
- a temperature with a bias per class (fitted by NLL): held-out ECE in sample.

Keras probabilities: model.keras on the held-out images, test_predictions.json for test.

    python benchmarks/calibration_fits.py artifacts/runs/alzheimer-64px-noaug-29min-ema
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mri_edge import metrics, trust  # noqa: E402
from mri_edge.keras_model import validation_reference  # noqa: E402

GRID = np.linspace(1, 8, 141)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ece(labels: np.ndarray, probs: np.ndarray) -> float:
    return metrics.calibration_metrics(labels, probs)["ece"]


def ece_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(GRID[int(np.argmin([ece(labels, trust.scale(probs, t)) for t in GRID]))])


def bias_fit(logp: np.ndarray, labels: np.ndarray, t0: float) -> np.ndarray:
    from scipy.optimize import minimize  # noqa: PLC0415

    def loss(v):
        return trust.nll(softmax(logp / v[0] + v[1:]), labels) + 1e-3 * (v[1:] ** 2).sum()

    return minimize(loss, np.r_[t0, np.zeros(logp.shape[1])], method="Nelder-Mead", options={"maxiter": 4000}).x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    ref, _ = validation_reference(args.run, lambda *a: None)
    ph, yh = np.asarray(ref["probs"], np.float64), np.asarray(ref["labels"])
    pred = json.loads((args.run / "test_predictions.json").read_text())
    pt, yt = np.asarray(pred["probs"], np.float64), np.asarray(pred["labels"])
    lh, lt = np.log(np.clip(ph, trust.FLOOR, 1)), np.log(np.clip(pt, trust.FLOOR, 1))  # as trust.scale

    rng = np.random.default_rng(0)
    fold = {"nll": [], "ece": []}
    for _ in range(args.repeats):
        parts = np.array_split(rng.permutation(len(yh)), 5)
        for k in range(5):
            tr = np.concatenate([parts[j] for j in range(5) if j != k])
            te = parts[k]
            fold["nll"].append(ece(yh[te], trust.scale(ph[te], trust.fit_temperature(ph[tr], yh[tr]))))
            fold["ece"].append(ece(yh[te], trust.scale(ph[te], ece_temperature(ph[tr], yh[tr]))))
    d = np.array(fold["ece"]) - np.array(fold["nll"])
    t_nll, t_ece = trust.fit_temperature(ph, yh), ece_temperature(ph, yh)
    v = bias_fit(lh, yh, t_nll)
    print(f"held-out: {len(yh)} images; 5-fold cross-validation x {args.repeats}, ECE of the left-out fold")
    print(f"  T by NLL: {np.mean(fold['nll']):.4f}   T by ECE: {np.mean(fold['ece']):.4f}   "
          f"difference {d.mean():+.4f} (standard error {d.std() / np.sqrt(len(d)):.4f})")
    print(f"  in sample: T by NLL {t_nll:.3f} ECE {ece(yh, trust.scale(ph, t_nll)):.4f}; "
          f"T + class bias (T {v[0]:.3f}) ECE {ece(yh, softmax(lh / v[0] + v[1:])):.4f}")
    print(f"test ({len(yt)} images, not used to decide): T by NLL {ece(yt, trust.scale(pt, t_nll)):.4f}, "
          f"T by ECE ({t_ece:.2f}) {ece(yt, trust.scale(pt, t_ece)):.4f}, T + class bias {ece(yt, softmax(lt / v[0] + v[1:])):.4f}")


if __name__ == "__main__":
    main()
