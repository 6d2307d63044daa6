"""``multivariate``: a device whose sensors, taken together, leave their usual relationship.

Per device (and window spec), the window means of its metrics form a vector. The detector keeps
an exponentially weighted mean and covariance of that vector over about ``memory`` windows
(equal weights during the first ``min_history``), and judges each window by Hotelling's T²:
the squared Mahalanobis distance of the vector from the mean, with the correlation matrix
shrunk towards the identity (by ``shrink`` after ``min_history`` windows, less as the history
grows: ``shrink * min_history / n``) so a short history cannot make it singular while a long
one keeps the relations it has learned. A pump
whose flow drops while its current stays put, a motor that heats without more load: each
sensor may stay inside its own range while the combination is new. Faults in SKAB's water
loop show like this.

Severity is ``T² / (threshold x typical T²)``, the typical value learned from the device's own
normal windows. The wrapper keeps a device in alert (and any window at or above the threshold)
out of the baseline, so a fault that lasts is not learned as the new normal.
A metric that did not report in a window keeps its last value.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt

from cloud.detect.base import PATTERN, DeviceFrame, Verdict
from cloud.detect.state import Column, StateArrays


class MultivariateDetector:
    name: ClassVar[str] = "multivariate"
    level: ClassVar[Literal["series", "device"]] = "device"

    def __init__(self, *, metrics: int = 16, memory: int = 1000, min_history: int = 30,
                 shrink: float = 0.3, threshold: float = 25.0, min_metrics: int = 2,
                 shrink_floor: float = 0.01) -> None:
        if not 0 <= shrink <= 1 or threshold <= 0 or min_history < 3 or memory < 2:
            raise ValueError("multivariate needs 0 <= shrink <= 1, threshold > 0, "
                             "min_history >= 3, memory >= 2")
        self.m = metrics
        self.alpha = 1.0 / memory
        self.min_history = min_history
        self.shrink = shrink
        self.threshold = threshold
        self.min_metrics = min_metrics
        self.shrink_floor = shrink_floor
        self.state = StateArrays({
            "mu": Column((metrics,), np.float64, np.nan),
            "cov": Column((metrics, metrics), np.float64, 0.0),
            "last": Column((metrics,), np.float64, np.nan),
            "t2": Column((), np.float64, np.nan),  # typical T² on normal windows
            "n": Column((), np.int64, 0),
        })

    def _t2(self, f: DeviceFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        k = f.key
        m = f.values.shape[1]
        x = np.where(np.isnan(f.values), self.state["last"][k, :m], f.values)
        mu = self.state["mu"][k, :m]
        active = np.isfinite(x) & np.isfinite(mu)
        d = np.where(active, x - mu, 0.0)
        cov = self.state["cov"][k, :m, :m]
        floor = np.nan_to_num(f.floor, nan=1e-12)
        var = np.maximum(np.diagonal(cov, axis1=1, axis2=2), floor ** 2)
        s = np.sqrt(var)
        z = d / s
        r = cov / (s[:, :, None] * s[:, None, :])
        eye = np.broadcast_to(np.eye(m), r.shape)
        both = active[:, :, None] & active[:, None, :]
        n = np.maximum(self.state["n"][k], 1)
        lam = np.clip(self.shrink * self.min_history / n, min(self.shrink_floor, self.shrink),
                      1.0)[:, None, None]
        r = np.where(both, (1 - lam) * r + lam * eye, eye)
        sol = np.linalg.solve(r, z[:, :, None])[:, :, 0]
        t2 = np.einsum("ij,ij->i", z, sol)
        return t2, x, active, mu

    def score(self, f: DeviceFrame) -> Verdict:
        out = Verdict.empty(len(f))
        k = f.key
        rows = np.flatnonzero(self.state["n"][k] >= self.min_history)
        if not len(rows):
            return out
        g = DeviceFrame(key=k[rows], start=f.start[rows], values=f.values[rows],
                        floor=f.floor[rows])
        t2, _, active, _ = self._t2(g)
        enough = active.sum(axis=1) >= self.min_metrics
        ref = np.fmax(self.state["t2"][g.key], 1.0)
        out.severity[rows] = np.where(enough, t2 / (self.threshold * ref), 0.0)
        out.direction[rows] = PATTERN
        out.value[rows] = t2
        out.reference[rows] = ref
        return out

    def learn(self, f: DeviceFrame, mask: npt.NDArray[np.bool_]) -> None:
        k = f.key
        m = f.values.shape[1]
        seen = np.isfinite(f.values)
        last = self.state["last"]
        last[k, :m] = np.where(seen, f.values, last[k, :m])
        rows = np.flatnonzero(mask)
        if not len(rows):
            return
        g = DeviceFrame(key=k[rows], start=f.start[rows], values=f.values[rows],
                        floor=f.floor[rows])
        kk = g.key
        n = self.state["n"][kk]
        t2, x, _, mu = self._t2(g)
        a = np.maximum(self.alpha, 1.0 / (n + 1))[:, None]
        x = np.where(np.isnan(x), mu, x)
        new_mu = np.where(np.isnan(mu), x, mu + a * (x - mu))
        d = np.nan_to_num(x - np.where(np.isnan(mu), x, mu))
        cov = self.state["cov"][kk, :m, :m]
        a3 = a[:, :, None]
        self.state["cov"][kk, :m, :m] = (1 - a3) * (cov + a3 * d[:, :, None] * d[:, None, :])
        self.state["mu"][kk, :m] = new_mu
        ready = n >= self.min_history
        t2_old = self.state["t2"][kk]
        self.state["t2"][kk] = np.where(
            ready, np.where(np.isnan(t2_old), t2, t2_old + a[:, 0] * (t2 - t2_old)), t2_old)
        self.state["n"][kk] = n + 1
