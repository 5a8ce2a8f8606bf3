"""The fused screening model: one graph, image in -> class probabilities, anomaly score, flag (and, for a
detector with parts, each part's standardised score).

Verdict rule (the same in the model, the runtime and the docs):

    flag    = anomaly_score > threshold         (threshold baked into the graph as a constant, and
                                                 also returned as the `threshold` output, so a runtime
                                                 can check that the manifest describes this model)
    verdict = "refer"    if flag                (human review: do not trust the AI on this scan)
              "classify" otherwise              (the class with the highest probability stands)

Clinical reading: the detector was fitted on clean scans only; a flag says the scan does not look
like the scans the classifier was built on (an adversarial perturbation, an artefact, another
device, another disease), so the AI's class for it must not be used -- a human reads the scan. A
scan that is not flagged is classified; its class is a screening result, not a diagnosis.

Part scores: for a medrobust.detection.Detector the screening model has a fifth output ``part_scores``
float32 [n, k]: each detector part's standardised score z (the scale the combination rule reads:
0 = a typical clean scan, higher = more unusual), in the order of ``detector_parts(detector)`` (the bundle
manifest's ``detector.parts``). They come out of the same graph as the combined score (the combination's
own inputs), so ``Detector.combine(part_scores)`` gives ``anomaly_score`` back; the part with the highest
z is the one that scored high. A detector without parts (anything with only ``score_model()``) gives the
four outputs as before.
"""

from __future__ import annotations

from medrobust_screen.screener import (OUTPUT_FLAG, OUTPUT_PART_SCORES, OUTPUT_PROBABILITIES, OUTPUT_SCORE,
                                       OUTPUT_THRESHOLD, VERDICT_RULE)

OUTPUT_LOGITS = "logits"


def combined_score(outputs):
    """The combined anomaly score from a detector score model's outputs (dict 'combined', list/tuple
    first element, or a single tensor), as a [n] tensor."""
    from keras import ops

    if isinstance(outputs, dict):
        if "combined" not in outputs:
            raise ValueError(f"detector score model outputs {sorted(outputs)} have no 'combined' score")
        score = outputs["combined"]
    elif isinstance(outputs, (list, tuple)):
        score = outputs[0]
    else:
        score = outputs
    return ops.reshape(ops.cast(score, "float32"), (-1,))


def _input(model, name: str = "image"):
    import keras

    shape = tuple(model.inputs[0].shape)[1:]
    return keras.Input(shape, name=name, dtype="float32")


def classifier_model(classifier):
    """classifier.tflite: image -> {'logits', 'probabilities'}."""
    import keras

    image = _input(classifier)
    logits = classifier(image)
    probabilities = keras.layers.Softmax(name=OUTPUT_PROBABILITIES)(logits)
    return keras.Model(image, {OUTPUT_LOGITS: logits, OUTPUT_PROBABILITIES: probabilities},
                       name="classifier_export")


def detector_parts(detector) -> list[dict] | None:
    """[{name, description}] of the detector's parts in part_scores order, or None for a detector that does
    not expose standardised part scores (no ``describe_parts``, or no parts)."""
    describe = getattr(detector, "describe_parts", None)
    if describe is None:
        return None
    parts = describe()
    if not parts:
        return None
    names = [p["name"] for p in parts]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"detector part names must be distinct non-empty strings, got {names}")
    return [{"name": p["name"], "description": str(p.get("description", ""))} for p in parts]


def score_function(detector, image_size: int, part_scores: bool = False):
    """(fn, keras models it uses, how): fn maps an image batch tensor to the combined score [n].

    Uses ``detector.score_model()`` (the documented export graph) when calling it works; a detector
    whose score model cannot be called on a batch (e.g. a reshape that baked the symbolic batch size
    into the graph) falls back to its ``score_tensor()``, the same differentiable ops run directly.
    part_scores=True (a detector with ``detector_parts``): fn returns (combined [n], part_scores [n, k]),
    both from one call of the detector's graph.
    """
    import keras
    import numpy as np

    if part_scores and detector_parts(detector) is None:
        raise ValueError("this detector exposes no part scores (no describe_parts())")
    model = detector.score_model(part_scores=True) if part_scores else detector.score_model()
    try:
        model(np.zeros((2, image_size, image_size, 1), np.float32), training=False)
    except Exception as exc:
        if not hasattr(detector, "score_tensor"):
            raise
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}" if str(exc).strip() else type(exc).__name__
        parts = [v for v in vars(detector).values() if isinstance(v, keras.Model)]
        how = f"detector.score_tensor() (detector.score_model() cannot be called: {reason[:200]})"
        if part_scores:
            def both(x):
                out = detector.score_tensor(x, with_part_scores=True)
                return combined_score(out), _as_matrix(out["part_scores"])
            return both, parts, how
        return (lambda x: combined_score(detector.score_tensor(x))), parts, how
    if part_scores:
        def both_model(x):
            out = model(x, training=False)
            return combined_score(out), _as_matrix(out[-1])
        return both_model, [model], "detector.score_model(part_scores=True)"
    return (lambda x: combined_score(model(x, training=False))), [model], "detector.score_model()"


def _as_matrix(part_scores):
    from keras import ops

    return ops.cast(part_scores, "float32")


def _graph(name: str, fn, image_size: int, outputs: list[str], parts: list):
    """A Keras model (subclassed) image -> dict outputs computed by fn, tracking the models in parts."""
    import keras
    import numpy as np

    class ExportGraph(keras.Model):
        def __init__(self):
            super().__init__(name=name)
            self.parts = list(parts)  # tracked: their variables are exported

        def call(self, image, training=False):
            return fn(image)

    graph = ExportGraph()
    graph.export_image_size, graph.export_outputs = int(image_size), list(outputs)
    graph(np.zeros((1, image_size, image_size, 1), np.float32))  # build
    return graph


def detector_model(detector, image_size: int):
    """detector.tflite: image -> {'anomaly_score'} (the detector's combined score)."""
    score, parts, _ = score_function(detector, image_size)
    return _graph("detector_export", lambda x: {OUTPUT_SCORE: score(x)}, image_size, [OUTPUT_SCORE], parts)


def screening_model(classifier, detector, threshold: float | None = None, part_scores: bool | None = None):
    """screening.tflite: image -> {'probabilities', 'anomaly_score', 'flag', 'threshold'} with
    flag = score > threshold (1.0 or 0.0, float32) and 'threshold' the [n] constant the flag is compared
    with, plus 'part_scores' [n, k] (module docstring) when part_scores is True (None: when the detector
    exposes them, ``detector_parts``). `threshold` defaults to detector.threshold; it is rounded to float32
    (the precision of the graph constant), so the manifest can state exactly the value the model uses."""
    from keras import ops

    if part_scores is None:
        part_scores = detector_parts(detector) is not None

    threshold = float(detector.threshold if threshold is None else threshold)
    if not threshold == threshold or threshold in (float("inf"), float("-inf")):
        raise ValueError(f"detector threshold must be a finite number, got {threshold}")
    threshold = float32(threshold)
    image_size = int(tuple(classifier.inputs[0].shape)[1])
    score_fn, parts, _ = score_function(detector, image_size, part_scores=part_scores)

    def fn(image):
        probabilities = ops.softmax(classifier(image, training=False), axis=-1)
        score, z = score_fn(image) if part_scores else (score_fn(image), None)
        baked = ops.zeros_like(score) + threshold  # a Python float: a graph constant
        flag = ops.cast(ops.greater(score, baked), "float32")
        out = {OUTPUT_PROBABILITIES: probabilities, OUTPUT_SCORE: score, OUTPUT_FLAG: flag, OUTPUT_THRESHOLD: baked}
        if z is not None:
            out[OUTPUT_PART_SCORES] = z
        return out

    outputs = [OUTPUT_PROBABILITIES, OUTPUT_SCORE, OUTPUT_FLAG, OUTPUT_THRESHOLD]
    return _graph("screening", fn, image_size, outputs + ([OUTPUT_PART_SCORES] if part_scores else []),
                  [classifier, *parts])


def float32(value: float) -> float:
    """value rounded to the nearest float32, as a Python float."""
    import numpy as np

    return float(np.float32(value))


__all__ = ["VERDICT_RULE", "combined_score", "detector_parts", "score_function", "classifier_model", "detector_model",
           "screening_model"]
