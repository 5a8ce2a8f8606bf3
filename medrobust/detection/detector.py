"""UAD: unsupervised adversarial (and out-of-distribution) detection for an OCT classifier.

A `Detector` watches one classifier f (image -> logits, with a penultimate layer "features") and
gives every image four anomaly scores, each higher = more suspicious:

- reconstruction: mean squared error between x and AE(x), AE a small denoising autoencoder trained
  on clean images only (no labels);
- feature: disagreement of the classifier with itself on x and on AE(x): Jensen-Shannon divergence of
  the softmaxes plus the L2 distance of the penultimate features (each divided by its mean on clean
  training images);
- mahalanobis: Mahalanobis distance of f's penultimate features to the nearest class-conditional
  Gaussian (shared covariance, Lee et al. 2018), fitted on clean training images with the classes the
  classifier predicts (so no labels are needed);
- boundary: -log of the top-1 minus top-2 logit margin, i.e. how close the features sit to one of the
  classifier's decision hyperplanes. Minimal-perturbation attacks (PGD that keeps the first
  misclassified iterate) leave their adversaries just across a boundary.

The parts are standardised on clean validation images (reconstruction, feature and mahalanobis on a
log scale) and combined into `combined` by the rule `combination`:

- "max" (default): max(z_boundary, z_anomaly), where z_anomaly is the standardised sum of the positive
  parts of the three other z-scores (an "is this a normal OCT scan at all" score);
- "sum": sum of the four z-scores;
- "max_all": max of the four z-scores.

A flag is raised when combined > threshold, the split-conformal (1 - target_fpr) quantile of
combined on clean validation images (scores.threshold_at_fpr: at most target_fpr false alarms). Everything in the score is TensorFlow/Keras ops: `score_tensor` is differentiable
(adaptive attacks) and `score_model()` is a plain Keras graph (TFLite export).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from medrobust.detection import scores as S
from medrobust.detection.autoencoder import build_autoencoder, train_autoencoder
from medrobust.io import atomic_save_model, atomic_write_bytes, atomic_write_json, package_versions, read_json
from medrobust.models import feature_model

PARTS = ("reconstruction", "feature", "mahalanobis", "boundary")
SCORE_NAMES = ("combined",) + PARTS
LOG_PARTS = ("reconstruction", "feature", "mahalanobis")  # positive, heavy-tailed: standardised as log
COMBINATIONS = ("max", "sum", "max_all")
FORMAT = "medrobust-uad/1"
AUTOENCODER_FILE, CONFIG_FILE, STATS_FILE = "autoencoder.keras", "detector.json", "stats.npz"
BOUNDARY_DELTA = 0.01
STAT_ARRAYS = ("means", "precision", "whitening")


class Detector:
    """Unsupervised adversarial detector for one classifier. Build it with `Detector.fit` or `Detector.load`."""

    def __init__(self, classifier: keras.Model, autoencoder: keras.Model, stats: dict[str, np.ndarray],
                 config: dict):
        self.classifier = classifier
        self.autoencoder = autoencoder
        self.stats = {k: np.asarray(stats[k], np.float32) for k in STAT_ARRAYS}
        self.config = dict(config)
        self._features = feature_model(classifier)
        # Compiled scorers; the Python floats of self.config are baked in when traced, so every config
        # change resets them.
        self._compiled = self._parts_fn = self._raw_fn = None
        self._check_shapes()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def fit(cls, classifier: keras.Model, x_train: np.ndarray, x_val: np.ndarray, epochs: int = 10,
            seed: int = 0, target_fpr: float = 0.05, combination: str = "max", y_train: np.ndarray | None = None,
            batch_size: int = 64, noise_std: float = 0.03, ae_width: int = 16, ae_latent: int = 4,
            progress: bool = False) -> "Detector":
        """Fit the detector on clean images: the autoencoder and the class Gaussians on x_train, the
        standardisation and threshold on x_val (keep x_val apart from x_train).

        y_train is optional; without it the Gaussians use the classes the classifier predicts, so the
        whole fit needs no labels. Calls keras.utils.set_random_seed(seed).
        """
        _check_images(x_train, "x_train")
        _check_images(x_val, "x_val")
        if len(x_train) < 2 or len(x_val) < 2:
            raise ValueError("need at least 2 training and 2 validation images")
        _check_choice(combination, COMBINATIONS, "combination")
        if not 0 < target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
        keras.utils.set_random_seed(seed)
        started = time.time()
        image_size = int(x_train.shape[1])
        fm = feature_model(classifier)
        logits, features = _predict(fm, x_train)
        labels = logits.argmax(axis=1) if y_train is None else np.asarray(y_train)
        gaussians = S.fit_class_gaussians(features, labels, num_classes=logits.shape[1])
        if progress:
            print(f"detector: class Gaussians on {len(x_train)} clean training features "
                  f"(dim {features.shape[1]}, Ledoit-Wolf shrinkage {float(gaussians['shrinkage']):.3g}); "
                  f"training the autoencoder for {epochs} epochs", flush=True)
        autoencoder = build_autoencoder(image_size, width=ae_width, latent=ae_latent)
        history = train_autoencoder(autoencoder, x_train, epochs=epochs, batch_size=batch_size,
                                    noise_std=noise_std, seed=seed,
                                    verbose=(1 if sys.stdout.isatty() else 2) if progress else 0)
        config = {
            "format": FORMAT, "image_size": image_size, "num_classes": int(logits.shape[1]),
            "feature_dim": int(features.shape[1]), "gaussian_labels": "predicted" if y_train is None else "given",
            "ledoit_wolf_shrinkage": float(gaussians["shrinkage"]), "boundary_delta": BOUNDARY_DELTA,
            "autoencoder": {"width": ae_width, "latent": ae_latent, "epochs": int(epochs), "noise_std": noise_std,
                            "batch_size": batch_size, "params": int(autoencoder.count_params()),
                            "final_loss": float(history["loss"][-1])},
            "n_train": int(len(x_train)), "seed": int(seed), "classifier": classifier.name,
            # Placeholders until calibrate(): the feature part divides by these, so set them first.
            "feature_scales": {"divergence": 1.0, "distance": 1.0},
        }
        detector = cls(classifier, autoencoder, gaussians, config)
        # Feature-part scales: mean divergence and feature distance on (up to 2000) clean training images.
        sub = x_train[np.random.default_rng(seed).permutation(len(x_train))[:2000]]
        raw = detector._raw_parts(sub)
        detector.config["feature_scales"] = {"divergence": max(float(raw["divergence"].mean()), 1e-12),
                                             "distance": max(float(raw["distance"].mean()), 1e-12)}
        detector.calibrate(x_val, target_fpr=target_fpr, combination=combination)
        detector.config["fit_seconds"] = round(time.time() - started, 2)
        if progress:
            print(f"detector: autoencoder MSE {history['loss'][-1]:.5f}; threshold {detector.threshold:.4f} "
                  f"({combination} rule, target FPR {target_fpr:g} on {len(x_val)} clean validation images)",
                  flush=True)
        return detector

    def calibrate(self, x_val: np.ndarray, target_fpr: float | None = None,
                  combination: str | None = None) -> "Detector":
        """(Re)fit the standardisation, the combination and the threshold on clean images x_val,
        keeping the autoencoder and the Gaussians. Returns self."""
        _check_images(x_val, "x_val")
        target_fpr = self.config.get("target_fpr", 0.05) if target_fpr is None else float(target_fpr)
        combination = self.config.get("combination", "max") if combination is None else combination
        _check_choice(combination, COMBINATIONS, "combination")
        if not 0 < target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
        self._compiled = self._parts_fn = None
        parts = self._parts_numpy(x_val)
        standardise = {}
        for name in PARTS:
            v = np.log(np.maximum(parts[name], 1e-12)) if name in LOG_PARTS else parts[name]
            standardise[name] = list(S.location_scale(v))
        self.config.update(standardise=standardise, combination=combination, target_fpr=target_fpr,
                           anomaly=[0.0, 1.0], threshold=math.inf)
        if combination == "max":
            z = self._z_numpy(parts)
            excess = sum(np.maximum(z[name], 0.0) for name in LOG_PARTS)
            self.config["anomaly"] = list(S.location_scale(excess))
        self._compiled = None
        combined = self.score(x_val)["combined"]
        self.config["threshold"] = S.threshold_at_fpr(combined, target_fpr)
        self.config["part_thresholds"] = {name: S.threshold_at_fpr(parts[name], target_fpr) for name in PARTS}
        self.config["n_val"] = int(len(x_val))
        self.config["val_fpr"] = float(np.mean(combined > self.config["threshold"]))
        return self

    # -- scoring ------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def target_fpr(self) -> float:
        return float(self.config["target_fpr"])

    @property
    def combination(self) -> str:
        return self.config["combination"]

    def score_tensor(self, x, with_logits: bool = False) -> dict[str, tf.Tensor]:
        """All scores of a batch x [n, s, s, 1] as tensors {'combined', 'reconstruction', 'feature',
        'mahalanobis', 'boundary'}: pure and differentiable, for use inside a GradientTape.
        with_logits=True adds 'logits', the classifier's logits at x from the same forward pass (an
        adaptive attack then needs no separate classifier call)."""
        x = tf.convert_to_tensor(x, tf.float32)
        out = self._graph(x, lambda m, v: m(v, training=False))
        logits = out.pop("logits")
        return {**out, "logits": logits} if with_logits else out

    def score(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Scores of every image as float32 numpy arrays [n], keyed like score_tensor."""
        _check_images(x, "x")
        if self._compiled is None:
            self._compiled = tf.function(self.score_tensor, reduce_retracing=True)
        outs = [self._compiled(tf.constant(x[i:i + batch_size], tf.float32)) for i in range(0, len(x), batch_size)]
        if not outs:
            return {name: np.zeros(0, np.float32) for name in SCORE_NAMES}
        return {name: np.concatenate([o[name].numpy() for o in outs]) for name in SCORE_NAMES}

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """True where an image is flagged (combined score above the threshold)."""
        return self.score(x, batch_size)["combined"] > self.threshold

    def part_flags(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-part flags at each part's own (1 - target_fpr) validation quantile (single-score baselines)."""
        return {name: scores[name] > self.config["part_thresholds"][name] for name in PARTS}

    def score_model(self) -> keras.Model:
        """A Keras model image -> [combined, reconstruction, feature, mahalanobis, boundary] (each [n],
        in SCORE_NAMES order, output layers named likewise), built from the classifier, the autoencoder
        and keras.ops; same numbers as score(). Built in memory: not meant to be saved as .keras."""
        s = self.config["image_size"]
        inputs = keras.Input((s, s, 1), name="image")
        out = self._graph(inputs, lambda m, v: m(v))
        outputs = [layers.Identity(name=name)(out[name]) for name in SCORE_NAMES]
        return keras.Model(inputs, outputs, name="uad_score")

    # -- the score graph (keras.ops only) -------------------------------------------------------------
    def _graph(self, x, call) -> dict:
        parts = self._parts_graph(x, call)
        c = self.config
        z = {}
        for name in PARTS:
            mean, std = c["standardise"][name]
            v = S.log_score(parts[name]) if name in LOG_PARTS else parts[name]
            z[name] = (v - mean) / std
        if c["combination"] == "sum":
            combined = z["reconstruction"] + z["feature"] + z["mahalanobis"] + z["boundary"]
        elif c["combination"] == "max_all":
            combined = ops.max(ops.stack([z[name] for name in PARTS], axis=1), axis=1)
        else:
            excess = ops.relu(z["reconstruction"]) + ops.relu(z["feature"]) + ops.relu(z["mahalanobis"])
            anomaly = (excess - c["anomaly"][0]) / c["anomaly"][1]
            combined = ops.maximum(z["boundary"], anomaly)
        return {"combined": combined, **{name: parts[name] for name in PARTS}, "logits": parts["logits"]}

    def _parts_graph(self, x, call) -> dict:
        raw = self._raw_graph(x, call)
        scales = self.config["feature_scales"]
        feature = raw["divergence"] / scales["divergence"] + raw["distance"] / scales["distance"]
        return {"reconstruction": raw["reconstruction"], "feature": feature, "mahalanobis": raw["mahalanobis"],
                "boundary": raw["boundary"], "logits": raw["logits"]}

    def _raw_graph(self, x, call) -> dict:
        rec = call(self.autoencoder, x)
        logits, features = call(self._features, x)
        logits_rec, features_rec = call(self._features, rec)
        return {
            "reconstruction": S.reconstruction_error(x, rec),
            "divergence": S.js_divergence(logits, logits_rec),
            "distance": S.l2_distance(features, features_rec),
            "mahalanobis": S.mahalanobis_distance(features, self.stats["means"], self.stats["whitening"]),
            "boundary": S.boundary_closeness(logits, self.config["boundary_delta"]),
            "logits": logits,
        }

    def _raw_parts(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The unscaled ingredients (divergence and distance separately); used to fit the feature scales."""
        if self._raw_fn is None:
            self._raw_fn = tf.function(lambda v: self._raw_graph(v, lambda m, t: m(t, training=False)),
                                       reduce_retracing=True)
        outs = [self._raw_fn(tf.constant(x[i:i + batch_size], tf.float32)) for i in range(0, len(x), batch_size)]
        return {k: np.concatenate([o[k].numpy() for o in outs]) for k in outs[0]}

    def _parts_numpy(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The four parts (no standardisation), traced afresh after each change of the feature scales."""
        if self._parts_fn is None:
            self._parts_fn = tf.function(lambda v: self._parts_graph(v, lambda m, t: m(t, training=False)),
                                         reduce_retracing=True)
        outs = [self._parts_fn(tf.constant(x[i:i + batch_size], tf.float32)) for i in range(0, len(x), batch_size)]
        return {k: np.concatenate([o[k].numpy() for o in outs]) for k in PARTS}

    def _z_numpy(self, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        z = {}
        for name in PARTS:
            mean, std = self.config["standardise"][name]
            v = np.log(np.maximum(parts[name], 1e-12)) if name in LOG_PARTS else parts[name]
            z[name] = ((v - mean) / std).astype(np.float32)
        return z

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the folder path/ with autoencoder.keras, detector.json and stats.npz (no pickle)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_model(self.autoencoder, path / AUTOENCODER_FILE)
        buffer = io.BytesIO()
        np.savez(buffer, **self.stats)
        atomic_write_bytes(path / STATS_FILE, buffer.getvalue())
        atomic_write_json(path / CONFIG_FILE, {**self.config, "score_names": list(SCORE_NAMES),
                                              "versions": package_versions()})
        return path

    @classmethod
    def load(cls, path, classifier: keras.Model) -> "Detector":
        """Load a detector saved by `save` for this classifier (the .keras file with safe_mode=True)."""
        path = Path(path)
        missing = [f for f in (AUTOENCODER_FILE, CONFIG_FILE, STATS_FILE) if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path}: not a saved detector (missing {', '.join(missing)})")
        config = read_json(path / CONFIG_FILE)
        if config.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_FILE}: unknown detector format {config.get('format')!r} "
                             f"(expected {FORMAT})")
        autoencoder = keras.models.load_model(path / AUTOENCODER_FILE, compile=False, safe_mode=True)
        with np.load(path / STATS_FILE, allow_pickle=False) as npz:
            absent = [k for k in STAT_ARRAYS if k not in npz.files]
            if absent:
                raise ValueError(f"{path / STATS_FILE}: missing arrays {', '.join(absent)}")
            stats = {k: npz[k] for k in STAT_ARRAYS}
        config.pop("versions", None)
        config.pop("score_names", None)
        return cls(classifier, autoencoder, stats, config)

    def _check_shapes(self) -> None:
        c = self.config
        s = c["image_size"]
        for name, model in (("classifier", self.classifier), ("autoencoder", self.autoencoder)):
            if tuple(model.input_shape[1:]) != (s, s, 1):
                raise ValueError(f"{name} takes images of shape {model.input_shape[1:]}, "
                                 f"the detector was fitted on ({s}, {s}, 1)")
        d = int(self._features.output[1].shape[-1])
        k = int(self._features.output[0].shape[-1])
        expected = (c["num_classes"], c["feature_dim"])
        if self.stats["means"].shape != expected or (k, d) != expected:
            raise ValueError(f"the detector's class Gaussians are {self.stats['means'].shape} (classes, features) "
                             f"but the classifier gives {k} classes and {d} features: wrong classifier?")


def train_detector(classifier: keras.Model, data, out_dir, epochs: int = 10, seed: int = 0,
                   target_fpr: float = 0.05, progress: bool = True) -> dict:
    """Fit a Detector on data['train'] images (no labels), calibrate on data['val'], save it to
    out_dir/detector and return metrics (threshold and clean false-alarm rates on data['test'])."""
    x_train, _ = data["train"]
    x_val, _ = data["val"]
    x_test, _ = data["test"]
    detector = Detector.fit(classifier, x_train, x_val, epochs=epochs, seed=seed, target_fpr=target_fpr,
                            progress=progress)
    saved = detector.save(Path(out_dir) / "detector")
    scores = detector.score(x_test)
    flags = scores["combined"] > detector.threshold
    metrics = {
        "detector_threshold": detector.threshold,
        "detector_target_fpr": detector.target_fpr,
        "detector_clean_fpr": float(flags.mean()),
        "detector_val_fpr": detector.config["val_fpr"],
        "detector_combination": detector.combination,
        "detector_n_test": int(len(x_test)),
        "detector_fit_seconds": detector.config["fit_seconds"],
    }
    for name, part_flags in detector.part_flags(scores).items():
        metrics[f"detector_clean_fpr_{name}"] = float(part_flags.mean())
    if progress:
        synthetic = " (SYNTHETIC phantom)" if getattr(data, "synthetic", False) else ""
        print(f"detector: clean false-alarm rate {metrics['detector_clean_fpr']:.4f} on {len(x_test)} test images "
              f"(target {target_fpr:g}){synthetic}; saved {saved}", flush=True)
    return metrics


# -- helpers ---------------------------------------------------------------------------------------------
def _predict(fm: keras.Model, x: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of x, batch by batch (eager: a single pass is not worth a trace)."""
    outs = [fm(tf.constant(x[i:i + batch_size], tf.float32), training=False) for i in range(0, len(x), batch_size)]
    return np.concatenate([o[0].numpy() for o in outs]), np.concatenate([o[1].numpy() for o in outs])


def _check_images(x, name: str) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 1 or shape[1] != shape[2]:
        raise ValueError(f"{name} must be images [n, s, s, 1], got shape {shape}")


def _check_choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
