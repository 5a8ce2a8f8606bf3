"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020), score-based black-box L-inf.

It needs only the model's output scores, never gradients, so it also runs against an exported model
(e.g. a LiteRT/TFLite interpreter wrapped in a numpy function). Random search: start from vertical
stripes of +-eps, then repeatedly overwrite a random square window (side shrinking with the paper's
p schedule) with a random +-eps per channel, keeping the change whenever the margin loss
z_y - max_{j != y} z_j decreases. Each image stops, and spends no more queries, once it is fooled.
Everything is numpy and vectorised over the batch.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]  # images [n, h, w, c] float32 -> [n, classes] logits or probs


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels in the square at iteration `it` of `n_iters` (the paper's schedule, defined for
    10,000 iterations and rescaled)."""
    it = int(it / n_iters * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256), (10000, 512)):
        if it <= bound:
            return p_init / div
    return p_init


def keras_predict_fn(model) -> PredictFn:
    """numpy -> numpy logits of a Keras model (model(x, training=False)) through one compiled call; it
    reads the model's variables, so it always sees the current weights."""
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda x: call(tf.convert_to_tensor(x, tf.float32)).numpy()


class _KerasPredict:
    """What SquareAttack queries when given a Keras model: its frozen inference graph while the weights
    stay as they were (medrobust.attacks.inference), refreshed at the start of every run."""

    def __init__(self, model):
        from medrobust.attacks.inference import ModelInference

        self.inference, self.version, self.call = ModelInference(model), None, None

    def refresh(self, x_sample) -> None:
        import tensorflow as tf

        fn, version = self.inference.current(x_sample)
        if version != self.version:
            self.call, self.version = tf.function(fn, reduce_retracing=True), version

    def __call__(self, x):
        import tensorflow as tf

        if self.call is None:
            self.refresh(x)
        return self.call(tf.convert_to_tensor(x, tf.float32)).numpy()


class SquareAttack:
    """attack = SquareAttack(predict_fn, n_queries=1000); x_adv = attack(x, y, eps)  -> numpy float32

    predict_fn(x_numpy [n, h, w, c] float32) -> numpy [n, classes], logits or probabilities; it must
    accept any batch size n >= 1 (only the images not yet fooled are queried). A Keras model may be
    passed instead (wrapped as model(x, training=False)). `output`: 'logits', 'probs' (margins are
    taken on log-probabilities, which equal logit margins) or 'auto' (probabilities if the clean
    outputs are non-negative and every row sums to 1).

    Queries: one clean query per image (images already misclassified are returned unchanged), then
    at most `n_queries` per image for the search (stripe initialisation + n_queries - 1 random-search
    steps, as in the paper). `run` also returns the per-image search-query counts.
    eps: L-inf radius in [0, 1] pixel scale, scalar or one per image. Output: numpy float32, same
    shape as x, inside the eps-ball and [0, 1]. Random draws come from np.random.default_rng(seed),
    created once per attack object (so repeated calls continue one reproducible stream).
    """

    def __init__(self, predict_fn, n_queries: int = 1000, p_init: float = 0.8, seed: int = 0, output: str = "auto"):
        if n_queries < 1:
            raise ValueError("n_queries must be >= 1")
        if output not in ("auto", "logits", "probs"):
            raise ValueError(f"output must be 'auto', 'logits' or 'probs', got {output!r}")
        if _is_keras_model(predict_fn):
            from medrobust.attacks.inference import check_single_output

            check_single_output(predict_fn, "SquareAttack")
            predict_fn = _KerasPredict(predict_fn)
        self.predict_fn, self.n_queries, self.p_init, self.output = predict_fn, n_queries, p_init, output
        self.rng = np.random.default_rng(seed)

    def __call__(self, x, y, eps, x_init=None) -> np.ndarray:
        return self.run(x, y, eps, x_init)[0]

    def _scores(self, x: np.ndarray, y: np.ndarray, probs: bool) -> tuple[np.ndarray, np.ndarray]:
        """(margin z_y - max_{j != y} z_j, fooled) per image, from one query."""
        out = np.asarray(self.predict_fn(np.ascontiguousarray(x, np.float32)), np.float64).reshape(len(x), -1)
        if probs:
            out = np.log(np.clip(out, 1e-30, None))
        rows = np.arange(len(x))
        true = out[rows, y]
        other = out.copy()
        other[rows, y] = -np.inf
        return true - other.max(axis=1), out.argmax(axis=1) != y

    def run(self, x, y, eps, x_init=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_adv numpy float32, search queries per image int, fooled per image bool).

        x_init (optional, like x): a starting point per image instead of the stripes, e.g. the
        adversaries of a smaller eps scaled up; it is clipped into the eps-ball and costs one query.
        Raises ValueError on pixels outside [0, 1], eps outside (0, 1] or labels that are not indices."""
        from medrobust.attacks.base import check_inputs

        x, y, eps = check_inputs(x, y, eps, "linf", None, "SquareAttack")
        if isinstance(self.predict_fn, _KerasPredict):
            self.predict_fn.refresh(x)
        if x.ndim != 4:
            raise ValueError(f"SquareAttack: x must be images [n, height, width, channels], got shape {x.shape}")
        y = y.astype(np.int64)
        n, h, w, c = x.shape
        eps = eps.reshape(n, 1, 1, 1)
        queries = np.zeros(n, np.int64)
        if n == 0:
            return x.copy(), queries, np.zeros(0, bool)

        # Clean check (not counted): misclassified images are returned as they are.
        raw = np.asarray(self.predict_fn(np.ascontiguousarray(x)), np.float64).reshape(n, -1)
        if y.max() >= raw.shape[1]:
            raise ValueError(f"SquareAttack: class indices must be in [0, {raw.shape[1]}), got {y.max()}")
        probs = self.output == "probs" or (
            self.output == "auto" and raw.min() >= 0 and np.allclose(raw.sum(axis=1), 1.0, atol=1e-3))
        fooled = raw.argmax(axis=1) != y
        x_best = x.copy()
        margin = np.full(n, -np.inf)

        # Vertical-stripe initialisation: +-eps per column (and channel), constant along the height.
        todo = np.flatnonzero(~fooled)
        if len(todo):
            if x_init is not None:
                start = np.asarray(x_init, np.float32)
                if start.shape != x.shape:
                    raise ValueError(f"SquareAttack: x_init must have the shape of x {x.shape}, got {start.shape}")
                x_best[todo] = np.clip(np.clip(start[todo], x[todo] - eps[todo], x[todo] + eps[todo]), 0.0, 1.0)
            else:
                stripes = self.rng.choice([-1.0, 1.0], size=(len(todo), 1, w, c)).astype(np.float32)
                x_best[todo] = np.clip(x[todo] + eps[todo] * stripes, 0.0, 1.0)
            margin[todo], fooled[todo] = self._scores(x_best[todo], y[todo], probs)
            queries[todo] += 1

        n_features = h * w * c
        for it in range(self.n_queries - 1):
            idx = np.flatnonzero(~fooled)
            if len(idx) == 0:
                break
            p = p_selection(self.p_init, it, self.n_queries)
            s = min(max(int(round(math.sqrt(p * n_features / c))), 1), min(h, w) - 1) if min(h, w) > 1 else 1
            top = self.rng.integers(0, h - s + 1, size=len(idx))
            left = self.rng.integers(0, w - s + 1, size=len(idx))
            # Only the s x s window changes: gather it ([m, s, s, c]) instead of working on whole images.
            window = (idx[:, None, None], (top[:, None] + np.arange(s))[:, :, None],
                      (left[:, None] + np.arange(s))[:, None, :])
            x_win, best_win, e = x[window], x_best[window], eps[idx]
            # A new +-eps per channel for the window, redrawn (a few times at most) while it would not
            # change the current best image.
            signs = np.zeros((len(idx), 1, 1, c), np.float32)
            redraw = np.ones(len(idx), bool)
            for _ in range(16):
                signs[redraw] = self.rng.choice([-1.0, 1.0], size=(int(redraw.sum()), 1, 1, c))
                new_win = np.clip(x_win + signs * e, 0.0, 1.0)
                redraw = ~np.any(np.abs(new_win - best_win) >= 1e-7, axis=(1, 2, 3))
                if not redraw.any():
                    break
            x_new = x_best[idx]
            x_new[(np.arange(len(idx))[:, None, None],) + window[1:]] = new_win
            m_new, f_new = self._scores(x_new, y[idx], probs)
            queries[idx] += 1
            accept = (m_new < margin[idx]) | f_new
            x_best[idx[accept]] = x_new[accept]
            margin[idx[accept]] = m_new[accept]
            fooled[idx[accept]] = f_new[accept]
        return x_best, queries, fooled


def _is_keras_model(obj) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, keras.Model)
