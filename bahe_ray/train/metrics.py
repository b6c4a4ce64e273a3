"""CTR metrics: AUC, logloss and GAUC (per-user AUC), and `Scored`, the scores they are computed from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray | list[str]) -> float:
    """Impression-weighted mean of per-user AUC over users with both labels (NaN if none).

    Vectorised: per-user average ranks of the scores (ties share their mean rank), then the
    Mann-Whitney form of AUC per user.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    _, codes = np.unique(np.asarray(users), return_inverse=True)
    order = np.lexsort((scores, codes))
    user, score, label = codes[order], scores[order], labels[order]
    n = len(user)
    position = np.arange(n)
    user_start = np.r_[True, user[1:] != user[:-1]]
    tie_start = user_start | np.r_[True, score[1:] != score[:-1]]
    tie = np.cumsum(tie_start) - 1
    tie_first = position[tie_start][tie]
    tie_size = np.bincount(tie)[tie]
    first_of_user = position[user_start][np.cumsum(user_start) - 1]
    rank = tie_first - first_of_user + (tie_size + 1) / 2.0  # 1-based, within the user
    count = np.bincount(user)
    positives = np.bincount(user, weights=label)
    negatives = count - positives
    pos_rank_sum = np.bincount(user, weights=rank * label)
    valid = (positives > 0) & (negatives > 0)
    if not valid.any():
        return float("nan")
    auc = (pos_rank_sum[valid] - positives[valid] * (positives[valid] + 1) / 2) / (positives[valid] * negatives[valid])
    return float(np.average(auc, weights=count[valid]))


def ctr_metrics(labels: np.ndarray, scores: np.ndarray, users: np.ndarray | list[str]) -> dict[str, float]:
    """AUC, logloss (sklearn), GAUC and the sample count; AUC and GAUC are NaN without both labels."""
    labels = np.asarray(labels)
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "logloss": float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])) if len(labels) else float("nan"),
        "gauc": gauc(labels, scores, users) if len(labels) else float("nan"),
        "samples": float(len(labels)),
    }


@dataclass
class Scored:
    """Scores of sample rows, in the order the source gave them."""

    user_ids: list[str]
    labels: np.ndarray
    scores: np.ndarray

    @classmethod
    def concat(cls, parts: Iterable[Scored]) -> Scored:
        parts = list(parts)
        return cls(
            [u for p in parts for u in p.user_ids],
            np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.float32),
            np.concatenate([p.scores for p in parts]) if parts else np.zeros(0, np.float32),
        )

    def metrics(self) -> dict[str, float]:
        return ctr_metrics(self.labels, self.scores, self.user_ids)
