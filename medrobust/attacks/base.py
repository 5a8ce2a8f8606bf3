"""What every attack shares: input checks, logits-vs-probabilities handling, and the host loop that runs
an attack's compiled steps in short chunks.

Chunks (about `CHUNK_SECONDS` of work each) are what make a long attack stoppable: TensorFlow does not
look at Ctrl-C inside a compiled loop, but Python raises KeyboardInterrupt as soon as a chunk returns.
Between chunks the images an attack has finished with (e.g. already fooled) are set aside and the rest
compacted, so the remaining steps are spent only on the images still being attacked.
"""

from __future__ import annotations

import math
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from medrobust.attacks.inference import ModelInference, check_single_output

CHUNK_SECONDS = 1.0  # target wall time of one compiled chunk (the latency of Ctrl-C)
_PROB_ATOL = 1e-3


# -- input checks -----------------------------------------------------------------------------------

def check_inputs(x, y, eps, norm: str | None = "linf", num_classes: int | None = None, name: str = "attack"):
    """Validated float32 images, int32 labels and one float32 budget per image, as numpy arrays.

    x: [n, ...] pixel values in [0, 1] (an image scaled to [0, 255] is refused, not attacked).
    y: [n] integer class indices in [0, num_classes).
    eps: scalar or [n]; L-inf budgets must lie in (0, 1], L2 ones in (0, sqrt(pixels)]; None skips it.
    Raises ValueError naming the problem.
    """
    x = np.asarray(x.numpy() if tf.is_tensor(x) else x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"{name}: x must be a batch of images [n, height, width, channels], got shape {x.shape}")
    n = len(x)
    if n and not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: x holds NaN or infinite pixel values")
    if n and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"{name}: pixel values must be in [0, 1], got [{x.min():g}, {x.max():g}] "
                         "(divide 8-bit images by 255)")
    y_raw = np.asarray(y.numpy() if tf.is_tensor(y) else y)
    if y_raw.ndim > 1 and y_raw.shape[1:] == (1,) * (y_raw.ndim - 1):
        y_raw = y_raw.reshape(-1)
    if y_raw.shape != (n,):
        raise ValueError(f"{name}: y must hold one class index per image ({n}), got shape {y_raw.shape}")
    if n and (not np.issubdtype(y_raw.dtype, np.number) or np.any(y_raw != np.round(y_raw))):
        raise ValueError(f"{name}: y must be integer class indices (not one-hot or probabilities)")
    y_int = y_raw.astype(np.int64)
    if n and (y_int.min() < 0 or (num_classes is not None and y_int.max() >= num_classes)):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{name}: class indices must be in {bound}, got {y_int.min()}..{y_int.max()}")
    if eps is None:
        return x, y_int.astype(np.int32), None
    e = np.asarray(eps.numpy() if tf.is_tensor(eps) else eps, dtype=np.float64).reshape(-1)
    if e.size == 1:
        e = np.full(n, e[0])
    if e.shape != (n,):
        raise ValueError(f"{name}: eps must be a scalar or one value per image ({n}), got {e.size} values")
    upper = 1.0 if norm == "linf" else math.sqrt(float(np.prod(x.shape[1:])))
    bad = ~np.isfinite(e) | (e <= 0) | (e > upper)
    if n and bad.any():
        unit = "L-inf in [0, 1] pixel scale" if norm == "linf" else f"L2 in pixel units, at most sqrt(pixels) = {upper:.4g}"
        raise ValueError(f"{name}: eps must be in (0, {upper:.4g}] ({unit}), got {e[bad][0]:g}")
    return x, y_int.astype(np.int32), e.astype(np.float32)


def num_classes_of(model) -> int | None:
    try:
        return int(model.output_shape[-1])
    except (AttributeError, TypeError, ValueError):
        return None


# -- logits or probabilities -------------------------------------------------------------------------

def outputs_probabilities(model, x_sample: np.ndarray) -> bool:
    """True if `model` ends in a softmax: its last layer's activation is softmax, or (any model) every
    output row of x_sample is non-negative and sums to 1."""
    last = getattr(model, "layers", [None])[-1] if getattr(model, "layers", None) else None
    activation = getattr(last, "activation", None)
    if getattr(activation, "__name__", "") == "softmax" or type(last).__name__ == "Softmax":
        return True
    out = np.asarray(model(tf.constant(x_sample[:64]), training=False), np.float64)
    return bool(out.ndim == 2 and out.shape[1] > 1 and out.min() >= 0
                and np.allclose(out.sum(axis=1), 1.0, atol=_PROB_ATOL))


def as_logits_fn(logits_of):
    """A Keras model as a function image batch -> logits (called with training=False); any other callable
    as it is."""
    if isinstance(logits_of, keras.Model):
        return lambda v: logits_of(v, training=False)
    return logits_of


def bind_logits(attack, x_sample: np.ndarray, name: str, needs_logits: bool, stacklevel: int = 3) -> bool:
    """Point `attack._logits` (image batch -> logits) at `attack.model` as it is now.

    An attack with an `objective_fn` (adaptive attacks: the objective calls the model itself) gets the
    model's own call, bound once.

    The function comes from the attack's `inference` (medrobust.attacks.inference.ModelInference,
    created here on first use): the model's frozen inference graph, or the model called through its
    variables while its weights keep changing between runs. Returns True when it changed since the
    last call: the attack must then rebuild its compiled functions, which captured the old one.

    A model that outputs probabilities is refused when `needs_logits` (DLR, C&W and FMN read logit
    margins, which a saturated softmax flattens; as IBM ART does), on every call, otherwise its
    log-probabilities are used (cross-entropy on them is exact: log softmax(log p) = log p) with a
    warning that gradients vanish where the softmax saturates. A model with several outputs is refused.
    Raises ValueError for the refused cases.
    """
    if getattr(attack, "objective_fn", None) is not None:
        if attack._logits is not None:
            return False
        attack._logits = as_logits_fn(attack.model)
        return True
    check_single_output(attack.model, name)
    if getattr(attack, "inference", None) is None:
        attack.inference = ModelInference(attack.model, "model" if getattr(attack, "jit_compile", False)
                                          else "constant-folded")
    probs = getattr(attack, "_probabilities", None)
    if probs is None and len(x_sample):
        probs = attack._probabilities = outputs_probabilities(attack.model, x_sample)
        if probs and not needs_logits:
            warnings.warn(f"{name}: the model outputs probabilities; attacking the log-probabilities instead "
                          "(exact for cross-entropy, but gradients vanish where the softmax saturates: "
                          "pass the logits model for a reliable evaluation)", stacklevel=stacklevel)
    if probs and needs_logits:
        raise ValueError(f"{name}: the model outputs probabilities (it ends in a softmax), but this attack "
                         "needs logits; pass the model without its final softmax")
    call, version = attack.inference.current(x_sample)
    if getattr(attack, "_logits_version", None) == version:
        return False
    attack._logits = (lambda v: tf.math.log(tf.maximum(call(v), 1e-30))) if probs else call
    attack._logits_version = version
    return True


# -- the chunked host loop ---------------------------------------------------------------------------

def run_steps(chunk_fn, const: dict, state: dict, steps: int, done: str | None = None,
              target_seconds: float | None = None) -> dict[str, np.ndarray]:
    """Advance a per-image attack state by `steps` steps and return it as numpy arrays (original order).

    chunk_fn(const, state, k0, n) -> state is a compiled function running steps k0 .. k0 + n - 1
    (k0, n int32 scalars); const and state map names to tensors whose first axis is the image. Chunks
    are sized to take about `target_seconds` (CHUNK_SECONDS) each. With `done` (a bool state entry that,
    once True for an image, freezes that image's state), finished images are set aside between chunks
    and the others compacted.
    """
    target = CHUNK_SECONDS if target_seconds is None else target_seconds
    state = {k: tf.convert_to_tensor(v) for k, v in state.items()}
    const = {k: tf.convert_to_tensor(v) for k, v in const.items()}
    _trace_for_any_batch(chunk_fn, const, state)
    rows = np.arange(int(next(iter(state.values())).shape[0]))
    out = {k: np.empty(tuple(v.shape), v.dtype.as_numpy_dtype) for k, v in state.items()}
    k, chunk = 0, 1
    while k < steps and len(rows):
        n = min(chunk, steps - k)
        started = time.perf_counter()
        state = chunk_fn(const, state, tf.constant(k, tf.int32), tf.constant(n, tf.int32))
        finished = state[done].numpy() if done is not None else None
        elapsed = time.perf_counter() - started
        k += n
        chunk = int(min(max(n * target / max(elapsed, 1e-4), 1, n / 4), 4 * n))
        if finished is None or not finished.any():
            continue
        if finished.all() or k >= steps:
            break
        if finished.mean() >= 0.1:  # compaction costs a copy: only when it frees a tenth of the work
            for key, value in state.items():
                out[key][rows[finished]] = value.numpy()[finished]
            keep = tf.constant(np.flatnonzero(~finished))
            rows = rows[~finished]
            state = {key: tf.gather(value, keep) for key, value in state.items()}
            const = {key: tf.gather(value, keep) for key, value in const.items()}
    for key, value in state.items():
        out[key][rows] = value.numpy()
    return out


def _trace_for_any_batch(chunk_fn, const: dict, state: dict) -> None:
    """Trace chunk_fn once for any number of images, so a shrinking batch (compaction, the last batch
    of a dataset) reuses the graph instead of retracing."""
    def spec(t):
        return tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)

    if hasattr(chunk_fn, "get_concrete_function"):
        scalar = tf.TensorSpec([], tf.int32)
        chunk_fn.get_concrete_function({k: spec(v) for k, v in const.items()},
                                       {k: spec(v) for k, v in state.items()}, scalar, scalar)


def batched(fn, arrays: tuple, batch_size: int = 512) -> np.ndarray:
    """Concatenate fn(*slices) over batches of the given numpy arrays."""
    n = len(arrays[0])
    if n == 0:
        return np.zeros(0, bool)
    if hasattr(fn, "get_concrete_function"):  # one trace for every batch size
        fn.get_concrete_function(*(tf.TensorSpec((None,) + a.shape[1:], tf.as_dtype(a.dtype)) for a in arrays))
    return np.concatenate([np.asarray(fn(*(tf.constant(a[i:i + batch_size]) for a in arrays)))
                           for i in range(0, n, batch_size)])


def per_image(v, x):
    """Broadcast a scalar or [batch] value to x's rank."""
    v = tf.cast(v, x.dtype)
    v = tf.broadcast_to(v, tf.shape(x)[:1]) if v.shape.rank == 0 else v
    return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1))
