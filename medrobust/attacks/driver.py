"""Run an attack over a whole array or dataset in batches, with a progress bar."""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm


def attack_batches(attack, x: np.ndarray, y: np.ndarray, eps, batch_size: int = 256, progress: bool = True,
                   desc: str = "attack", x_init: np.ndarray | None = None) -> np.ndarray:
    """Adversarial copies of x (same order). `attack(x, y, eps)` is any medrobust attack; eps a scalar
    or one value per image; x_init (optional, like x) is passed on as `attack(..., x_init=...)`."""
    eps = np.asarray(eps, np.float32)
    out = np.empty_like(x, dtype=np.float32)
    # disable=None: bars only on a terminal, never in a log file
    bar = tqdm(total=len(x), desc=desc, unit="img", disable=None if progress else True, leave=False)
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        batch_eps = eps if eps.ndim == 0 else eps[start:stop]
        extra = {} if x_init is None else {"x_init": x_init[start:stop]}
        x_adv = attack(x[start:stop], y[start:stop], batch_eps, **extra)
        out[start:stop] = x_adv.numpy() if tf.is_tensor(x_adv) else np.asarray(x_adv)  # numpy: SquareAttack
        bar.update(stop - start)
    bar.close()
    return out


def predict_labels(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class of every image, through a compiled inference call (no Keras predict overhead)."""
    call = _compiled_call(model)
    return np.concatenate([
        tf.argmax(call(tf.constant(x[i:i + batch_size])), axis=-1).numpy()
        for i in range(0, len(x), batch_size)
    ]) if len(x) else np.zeros(0, np.int64)


def predict_logits(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """float32 [n, classes] outputs of the model on x, through the same compiled inference call."""
    call = _compiled_call(model)
    if not len(x):
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate([call(tf.constant(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)])


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 [n, classes] softmax of logits [n, classes] (max-subtracted, so large logits do not overflow)."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def predict_probabilities(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """float64 [n, classes] softmax of the model's logits on x (predict_logits, then softmax)."""
    return softmax(predict_logits(model, x, batch_size))


def accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    return float(np.mean(predict_labels(model, x, batch_size) == y))


def robust_accuracy(model, attack, x: np.ndarray, y: np.ndarray, eps, batch_size: int = 256,
                    progress: bool = True) -> float:
    """Accuracy on attacked copies of x (clean misclassifications count as failures)."""
    x_adv = attack_batches(attack, x, y, eps, batch_size, progress)
    return accuracy(model, x_adv, y, batch_size)


_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_call(model):
    if model not in _CALLS:
        _CALLS[model] = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return _CALLS[model]
