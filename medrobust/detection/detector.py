"""UAD: unsupervised adversarial (and out-of-distribution) detection for an OCT classifier.

A `Detector` watches one classifier f (image -> logits, with a penultimate layer "features") and gives
every image a set of anomaly scores ("parts"), each higher = more suspicious. Every part is fitted on
clean images only, with no labels (class statistics use the classes f predicts):

- reconstruction: mean squared error between x and AE(x), AE a small denoising autoencoder trained on
  clean images (MagNet-style, Meng & Chen 2017);
- feature: disagreement of f with itself on x and on AE(x): Jensen-Shannon divergence of the softmaxes
  plus the L2 distance of the penultimate features (each divided by its mean on clean training images);
- mahalanobis: Mahalanobis distance of f's penultimate features to the nearest class-conditional
  Gaussian (shared Ledoit-Wolf covariance; Lee, Lee, Lee & Shin, NeurIPS 2018);
- mahalanobis_early, mahalanobis_middle: the same on the spatially averaged feature maps of an early and a
  middle layer (Lee et al. 2018's multi-layer scores; layers chosen by `taps.default_taps`): the early
  maps still see the pixel noise that a small perturbation adds;
- residual: energy of the high-pass residual x - median3x3(x) in the image's dark region (the vitreous
  above the retina and the deep tissue below, estimated per image; scores.dark_residual_energy): an L-inf
  perturbation covers the whole image, where clean OCT has only speckle;
- squeeze_bits, squeeze_median: feature squeezing (Xu, Evans & Qi, NDSS 2018): the L1 distance between
  softmax(f(x)) and softmax(f(squeeze(x))), squeeze = bit-depth reduction to `squeeze_bits` bits (default 5),
  resp. the max over 2x2 and 3x3 median smoothing. Xu et al. take one max over all squeezers; they are two
  parts here because on real scans their clean distances differ by an order of magnitude (the median
  squeezers' dominate a joint max) and only bit-depth reduction separated adversaries (benchmarks/
  detector_quality.py). Bit-depth reduction is differentiated by BPDA (Athalye, Carlini & Wagner, ICML
  2018; straight-through identity), so an adaptive attacker sees its true influence, not a zero gradient;
- boundary: -log of the top-1 minus top-2 logit margin: how close x sits to one of f's decision
  hyperplanes. Minimal-perturbation attacks leave their adversaries just across a boundary.

Which parts a detector computes is `config["parts"]` (`Detector.fit(parts=...)`); the parts are
standardised on clean validation images (positive, heavy-tailed parts on a log scale) and combined into
`combined` by the rule `combination`:

- "max" (default): max(z_boundary, z_anomaly), z_anomaly the standardised sum of the positive parts of
  the other z-scores (an "is this a normal OCT scan at all" score);
- "sum": sum of the z-scores;
- "max_all": max of the z-scores (a Bonferroni-style union of one-part tests);
- "sum_positive": the standardised sum of the positive parts of all z-scores (a Fisher-style pooling of
  one-sided evidence).

A flag is raised when combined > threshold, the split-conformal (1 - target_fpr) quantile of combined on
clean validation images (scores.threshold_at_fpr: at most target_fpr false alarms). Everything in the
score is TensorFlow/Keras ops: `score_tensor` is differentiable (adaptive attacks) and `score_model()` is a
plain Keras graph (TFLite export; filters are min/max networks and slices, no sort or pad op).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from medrobust.detection import scores as S
from medrobust.detection import storage
from medrobust.detection.autoencoder import build_autoencoder, train_autoencoder
from medrobust.detection.graph import ScoreGraph
from medrobust.detection.parts import (AE_PARTS, ALL_PARTS, BOUNDARY_DELTA, COMBINATIONS,  # noqa: F401 (re-exported)
                                       DEFAULT_PARTS, GAUSSIAN_ARRAYS, LEGACY_PARTS, LOG_FLOORS, LOG_PARTS,
                                       MEDIAN_SQUEEZERS, PART_DESCRIPTIONS, PART_SCALE, PARTS,
                                       RESIDUAL_DEFAULTS, SCORE_NAMES, SQUEEZE_BITS,
                                       STAT_PREFIX, combine_np, log_np, pooled_parts)
from medrobust.detection.taps import TAP_NAMES, default_taps, flat_layers, stage_ends, tap_model

# The part names and settings live in medrobust.detection.parts, the files in .storage; importable from here too.
FORMAT, LEGACY_FORMAT = storage.FORMAT, storage.LEGACY_FORMAT


class Detector(ScoreGraph):
    """Unsupervised adversarial detector for one classifier. Build it with `Detector.fit` or `Detector.load`."""

    def __init__(self, classifier: keras.Model, autoencoder: keras.Model | None, stats: dict[str, np.ndarray],
                 config: dict):
        self.classifier = classifier
        self.config = dict(config)
        self.config.setdefault("parts", list(LEGACY_PARTS))
        parts = self.parts
        unknown = [p for p in parts if p not in ALL_PARTS]
        if unknown or not parts or len(set(parts)) != len(parts):
            raise ValueError(f"parts must be distinct names from {', '.join(ALL_PARTS)}, got {parts}")
        self.autoencoder = autoencoder if any(p in AE_PARTS for p in parts) else None
        if self.autoencoder is None and any(p in AE_PARTS for p in parts):
            raise ValueError(f"parts {', '.join(p for p in parts if p in AE_PARTS)} need the autoencoder")
        self.stats = {k: np.asarray(v, np.float32) for k, v in stats.items() if k in self._stat_keys()}
        missing = [k for k in self._stat_keys() if k not in self.stats]
        if missing:
            raise ValueError(f"the detector's statistics lack {', '.join(missing)}")
        self._taps = self._resolve_taps(classifier)
        self._model = tap_model(classifier, self._taps)  # x -> [logits, features, *tap maps]
        # Compiled scorers; the Python floats of self.config are baked in when traced, so every config
        # change resets them.
        self._compiled = self._parts_fn = self._raw_fn = None
        self._check_shapes()

    def _resolve_taps(self, classifier: keras.Model) -> dict[str, str]:
        """The tapped layers by name; a classifier whose layers carry other names (Keras numbers unnamed
        layers per session) is tapped at the same stage-end position instead, and _check_shapes then
        verifies the dimensions."""
        names = {layer.name for layer in flat_layers(classifier)}
        taps = {}
        for name in TAP_NAMES:
            if f"mahalanobis_{name}" not in self.parts:
                continue
            layer = self.config["taps"][name]
            if layer not in names:
                ends, index = stage_ends(classifier), self.config.get("tap_stages", {}).get(name)
                if index is None or index >= len(ends):
                    raise ValueError(f"the classifier has no layer {layer!r} (the detector's {name} tap) and no "
                                     "stage end at its position: wrong classifier for these features?")
                layer = ends[index]
            taps[name] = layer
        return taps

    def _stat_keys(self) -> list[str]:
        return [STAT_PREFIX[p] + k for p in self.parts if p in STAT_PREFIX for k in GAUSSIAN_ARRAYS]

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.config["parts"])

    @property
    def score_names(self) -> tuple[str, ...]:
        return ("combined",) + self.parts

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def fit(cls, classifier: keras.Model, x_train: np.ndarray, x_val: np.ndarray, epochs: int = 10,
            seed: int = 0, target_fpr: float = 0.05, combination: str = "max", y_train: np.ndarray | None = None,
            batch_size: int = 64, noise_std: float = 0.03, ae_width: int = 16, ae_latent: int = 4,
            parts=DEFAULT_PARTS, taps: dict[str, str] | None = None, squeeze_bits: int = SQUEEZE_BITS,
            progress: bool = False) -> "Detector":
        """Fit the detector on clean images: the autoencoder and the class Gaussians on x_train, the
        standardisation and threshold on x_val (keep x_val apart from x_train).

        parts: which scores to compute and combine (see the module docstring); the autoencoder is trained only
        when reconstruction or feature is among them. taps: {'early': layer name, 'middle': layer name} for
        the multi-layer Mahalanobis parts (default `taps.default_taps(classifier)`). squeeze_bits: grey-level
        bits (1..7) of the squeeze_bits part.
        y_train is optional; without it the Gaussians use the classes the classifier predicts, so the
        whole fit needs no labels. Calls keras.utils.set_random_seed(seed). Raises ValueError for a bad
        shape, option or too few images, before any training.
        """
        _check_images(x_train, "x_train")
        _check_images(x_val, "x_val")
        if len(x_train) < 2 or len(x_val) < 2:
            raise ValueError("need at least 2 training and 2 validation images")
        _check_choice(combination, COMBINATIONS, "combination")
        if not 0 < target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
        parts = list(parts)
        for p in parts:
            _check_choice(p, ALL_PARTS, "part")
        if not (isinstance(squeeze_bits, (int, np.integer)) and 1 <= squeeze_bits <= 7):
            raise ValueError(f"squeeze_bits must be an integer in 1..7, got {squeeze_bits!r}")
        keras.utils.set_random_seed(seed)
        started = time.time()
        image_size = int(x_train.shape[1])
        tapped = [name for name in TAP_NAMES if f"mahalanobis_{name}" in parts]
        taps = dict(taps) if taps else (default_taps(classifier) if tapped else {})
        missing = [name for name in tapped if name not in taps]
        if missing:
            raise ValueError(f"taps must name a layer for {', '.join(missing)}, got {taps}")
        taps = {name: taps[name] for name in tapped}
        model = tap_model(classifier, taps)
        outs = _predict(model, x_train)
        logits = outs[0]
        labels = logits.argmax(axis=1) if y_train is None else np.asarray(y_train)
        stats, shrinkage = {}, {}
        layer_features = {"mahalanobis": outs[1],
                          **{f"mahalanobis_{name}": outs[2 + i] for i, name in enumerate(taps)}}
        for part, feats in layer_features.items():
            if part not in parts:
                continue
            g = S.fit_class_gaussians(feats, labels, num_classes=logits.shape[1])
            stats.update({STAT_PREFIX[part] + k: g[k] for k in GAUSSIAN_ARRAYS})
            shrinkage[part] = float(g["shrinkage"])
        if progress:
            print(f"detector: parts {', '.join(parts)}; class Gaussians on {len(x_train)} clean training images "
                  f"({', '.join(f'{p} dim {layer_features[p].shape[1]}' for p in shrinkage)})", flush=True)
        autoencoder, history = None, None
        config = {
            "format": FORMAT, "parts": parts, "image_size": image_size, "num_classes": int(logits.shape[1]),
            "feature_dim": int(outs[1].shape[1]), "gaussian_labels": "predicted" if y_train is None else "given",
            "ledoit_wolf_shrinkage": shrinkage, "boundary_delta": BOUNDARY_DELTA, "taps": taps,
            "tap_dims": {name: int(outs[2 + i].shape[1]) for i, name in enumerate(taps)},
            "tap_stages": {name: stage_ends(classifier).index(layer) for name, layer in taps.items()
                           if layer in stage_ends(classifier)},
            "squeeze_bits": int(squeeze_bits), "residual": dict(RESIDUAL_DEFAULTS),
            "n_train": int(len(x_train)), "seed": int(seed), "classifier": classifier.name,
            # Placeholders until calibrate(): the feature part divides by these, so set them first.
            "feature_scales": {"divergence": 1.0, "distance": 1.0},
        }
        if any(p in AE_PARTS for p in parts):
            if progress:
                print(f"detector: training the autoencoder for {epochs} epochs", flush=True)
            autoencoder = build_autoencoder(image_size, width=ae_width, latent=ae_latent)
            history = train_autoencoder(autoencoder, x_train, epochs=epochs, batch_size=batch_size,
                                        noise_std=noise_std, seed=seed,
                                        verbose=(1 if sys.stdout.isatty() else 2) if progress else 0)
            config["autoencoder"] = {"width": ae_width, "latent": ae_latent, "epochs": int(epochs),
                                     "noise_std": noise_std, "batch_size": batch_size,
                                     "params": int(autoencoder.count_params()),
                                     "final_loss": float(history["loss"][-1])}
        detector = cls(classifier, autoencoder, stats, config)
        if "feature" in parts:
            # Feature-part scales: mean divergence and feature distance on (up to 2000) clean training images.
            sub = x_train[np.random.default_rng(seed).permutation(len(x_train))[:2000]]
            raw = detector._raw_parts(sub)
            detector.config["feature_scales"] = {"divergence": max(float(raw["divergence"].mean()), 1e-12),
                                                 "distance": max(float(raw["distance"].mean()), 1e-12)}
        detector.calibrate(x_val, target_fpr=target_fpr, combination=combination)
        detector.config["fit_seconds"] = round(time.time() - started, 2)
        if progress:
            ae = f"autoencoder MSE {history['loss'][-1]:.5f}; " if history else ""
            print(f"detector: {ae}threshold {detector.threshold:.4f} ({combination} rule, target FPR "
                  f"{target_fpr:g} on {len(x_val)} clean validation images)", flush=True)
        return detector

    def with_parts(self, parts, x_val: np.ndarray, combination: str | None = None,
                   target_fpr: float | None = None) -> "Detector":
        """A detector that computes and combines only `parts` (a subset of this one's), sharing this one's
        autoencoder and statistics, calibrated afresh on clean x_val. Raises ValueError for a part this
        detector was not fitted with."""
        parts = list(parts)
        absent = [p for p in parts if p not in self.parts]
        if absent or not parts:
            raise ValueError(f"parts must be a non-empty subset of {', '.join(self.parts)}, got {parts}")
        config = {**self.config, "parts": parts,
                  "taps": {k: v for k, v in self.config.get("taps", {}).items() if f"mahalanobis_{k}" in parts}}
        return Detector(self.classifier, self.autoencoder, self.stats, config).calibrate(
            x_val, target_fpr=target_fpr, combination=combination or self.config.get("combination", "max"))

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
        standardise = {name: list(S.location_scale(log_np(name, parts[name]))) for name in self.parts}
        self.config.update(standardise=standardise, combination=combination, target_fpr=target_fpr,
                           anomaly=[0.0, 1.0], threshold=math.inf)
        pooled = pooled_parts(self.parts, combination)
        if pooled:
            z = self._z_numpy(parts)
            excess = sum(np.maximum(z[name], 0.0) for name in pooled)
            self.config["anomaly"] = list(S.location_scale(excess))
        self._compiled = None
        combined = self.score(x_val)["combined"]
        self.config["threshold"] = S.threshold_at_fpr(combined, target_fpr)
        self.config["part_thresholds"] = {name: S.threshold_at_fpr(parts[name], target_fpr) for name in self.parts}
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

    def score_tensor(self, x, with_logits: bool = False, with_part_scores: bool = False) -> dict[str, tf.Tensor]:
        """All scores of a batch x [n, s, s, 1] as tensors {'combined', *parts}: pure and differentiable
        (bit-depth squeezing by BPDA), for use inside a GradientTape. with_logits=True adds 'logits', the
        classifier's logits at x from the same forward pass (an adaptive attack then needs no separate
        classifier call); with_part_scores=True adds 'part_scores' [n, k], the standardised part scores the
        combination reads (`part_scores`)."""
        x = tf.convert_to_tensor(x, tf.float32)
        out = self._graph(x, lambda m, v: m(v, training=False), with_part_scores)
        logits = out.pop("logits")
        return {**out, "logits": logits} if with_logits else out

    def score(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Scores of every image as float32 numpy arrays [n], keyed like score_tensor."""
        _check_images(x, "x")
        if self._compiled is None:
            self._compiled = tf.function(self.score_tensor, reduce_retracing=True)
        outs = [self._compiled(tf.constant(x[i:i + batch_size], tf.float32)) for i in range(0, len(x), batch_size)]
        if not outs:
            return {name: np.zeros(0, np.float32) for name in self.score_names}
        return {name: np.concatenate([o[name].numpy() for o in outs]) for name in self.score_names}

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """True where an image is flagged (combined score above the threshold)."""
        return self.score(x, batch_size)["combined"] > self.threshold

    def part_scores(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The standardised part scores [n, k] (k = len(parts), in parts order) of `score()` output: each
        part on the scale the combination rule reads (parts.PART_SCALE); `combine` turns them into the
        combined score."""
        z = self._z_numpy(scores)
        return np.stack([z[name] for name in self.parts], axis=1) if self.parts else np.zeros((0, 0), np.float32)

    def combine(self, part_scores: np.ndarray) -> np.ndarray:
        """The combined score [n] from standardised part scores [n, k] (numpy, float64), by this detector's
        combination rule: the twin of the graph's combination. ValueError for a wrong shape."""
        z = np.asarray(part_scores, np.float64)
        if z.ndim != 2 or z.shape[1] != len(self.parts):
            raise ValueError(f"part scores must be [n, {len(self.parts)}] ({', '.join(self.parts)}), got {z.shape}")
        return combine_np({name: z[:, i] for i, name in enumerate(self.parts)}, self.parts, self.combination,
                          self.config.get("anomaly", (0.0, 1.0)))

    def describe_parts(self) -> list[dict]:
        """[{name, description}] of the parts, in order (the bundle manifest's detector.parts)."""
        return [{"name": name, "description": PART_DESCRIPTIONS[name]} for name in self.parts]

    def combination_rule(self) -> dict:
        """How the combined score is made from the part scores, as plain data (for a bundle manifest)."""
        rule = self.combination
        out = {"rule": rule, "part_scale": PART_SCALE}
        pooled = pooled_parts(self.parts, rule)
        if pooled:
            out.update(pooled=list(pooled), anomaly=[float(v) for v in self.config["anomaly"]])
        formula = {"sum": "combined = sum of the part scores",
                   "max_all": "combined = max of the part scores",
                   "sum_positive": "combined = (sum of max(z, 0) over all parts - anomaly[0]) / anomaly[1]",
                   "max": ("combined = max(z_boundary, (sum of max(z, 0) over the pooled parts - anomaly[0]) / "
                           "anomaly[1])" if "boundary" in self.parts and pooled else
                           "combined = z_boundary" if "boundary" in self.parts else
                           "combined = (sum of max(z, 0) over the pooled parts - anomaly[0]) / anomaly[1]")}
        out["formula"] = formula[rule]
        return out

    def part_flags(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-part flags at each part's own (1 - target_fpr) validation quantile (single-score baselines)."""
        return {name: scores[name] > self.config["part_thresholds"][name] for name in self.parts}

    def score_model(self, part_scores: bool = False) -> keras.Model:
        """A Keras model image -> [combined, *parts] (each [n], in score_names order, output layers named
        likewise), built from the classifier, the autoencoder and keras.ops; same numbers as score().
        part_scores=True appends 'part_scores' [n, k] (the standardised parts, as `part_scores`), from the
        same graph as combined. Built in memory: not meant to be saved as .keras."""
        s = self.config["image_size"]
        inputs = keras.Input((s, s, 1), name="image")
        out = self._graph(inputs, lambda m, v: m(v), with_part_scores=part_scores)
        names = self.score_names + (("part_scores",) if part_scores else ())
        outputs = [layers.Identity(name=name)(out[name]) for name in names]
        return keras.Model(inputs, outputs, name="uad_score")

    def _raw_parts(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The unscaled ingredients (divergence and distance separately); used to fit the feature scales."""
        if self._raw_fn is None:
            self._raw_fn = tf.function(lambda v: self._raw_graph(v, lambda m, t: m(t, training=False)),
                                       reduce_retracing=True)
        outs = [self._raw_fn(tf.constant(x[i:i + batch_size], tf.float32)) for i in range(0, len(x), batch_size)]
        return {k: np.concatenate([o[k].numpy() for o in outs]) for k in outs[0]}

    def _parts_numpy(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The parts (no standardisation), traced afresh after each change of the feature scales."""
        if self._parts_fn is None:
            self._parts_fn = tf.function(lambda v: self._parts_graph(v, lambda m, t: m(t, training=False)),
                                         reduce_retracing=True)
        outs = [self._parts_fn(tf.constant(x[i:i + batch_size], tf.float32)) for i in range(0, len(x), batch_size)]
        return {k: np.concatenate([o[k].numpy() for o in outs]) for k in self.parts}

    def _z_numpy(self, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        z = {}
        for name in self.parts:
            mean, std = self.config["standardise"][name]
            z[name] = ((log_np(name, parts[name]) - mean) / std).astype(np.float32)
        return z

    # -- persistence (medrobust.detection.storage) ----------------------------------------------------
    def save(self, path) -> Path:
        """Write the folder path/ with detector.json, stats.npz and (when a part uses it) autoencoder.keras;
        no pickle."""
        return storage.save(self, path)

    @classmethod
    def load(cls, path, classifier: keras.Model) -> "Detector":
        """Load a detector saved by `save` for this classifier (the .keras file with safe_mode=True, the
        arrays with allow_pickle=False). Reads formats medrobust-uad/2 and /1 (the four original parts).
        Raises ValueError naming the file for a missing file, unknown format or missing array."""
        return cls(classifier, *storage.read(path))

    def _check_shapes(self) -> None:
        c = self.config
        s = c["image_size"]
        models = [("classifier", self.classifier)] + ([("autoencoder", self.autoencoder)] if self.autoencoder else [])
        for name, model in models:
            if tuple(model.input_shape[1:]) != (s, s, 1):
                raise ValueError(f"{name} takes images of shape {model.input_shape[1:]}, "
                                 f"the detector was fitted on ({s}, {s}, 1)")
        k = int(self._model.outputs[0].shape[-1])
        dims = {"mahalanobis": int(self._model.outputs[1].shape[-1]),
                **{f"mahalanobis_{name}": int(self._model.outputs[2 + i].shape[-1])
                   for i, name in enumerate(self._taps)}}
        if k != c["num_classes"]:
            raise ValueError(f"the detector was fitted for {c['num_classes']} classes but the classifier gives {k}: "
                             "wrong classifier?")
        for part, d in dims.items():
            if part not in self.parts:
                continue
            means = self.stats[STAT_PREFIX[part] + "means"]
            if means.shape != (k, d):
                raise ValueError(f"the detector's {part} class Gaussians are {means.shape} (classes, features) but "
                                 f"the classifier gives {k} classes and {d} features: wrong classifier?")


def train_detector(classifier: keras.Model, data, out_dir, epochs: int = 10, seed: int = 0,
                   target_fpr: float = 0.05, parts=None, progress: bool = True) -> dict:
    """Fit a Detector on data['train'] images (no labels), calibrate on data['val'], save it to
    out_dir/detector and return metrics (threshold and clean false-alarm rates on data['test']).
    parts: the detector's parts (default DEFAULT_PARTS)."""
    x_train, _ = data["train"]
    x_val, _ = data["val"]
    x_test, _ = data["test"]
    detector = Detector.fit(classifier, x_train, x_val, epochs=epochs, seed=seed, target_fpr=target_fpr,
                            parts=DEFAULT_PARTS if parts is None else parts, progress=progress)
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
def _predict(model: keras.Model, x: np.ndarray, batch_size: int = 128) -> list[np.ndarray]:
    """The tap model's outputs for x, batch by batch: [logits, features, *spatially averaged tap maps]
    (eager: a single pass is not worth a trace)."""
    outs = []
    for i in range(0, len(x), batch_size):
        o = model(tf.constant(x[i:i + batch_size], tf.float32), training=False)
        outs.append([o[0].numpy(), o[1].numpy()] + [ops.mean(t, axis=(1, 2)).numpy() for t in o[2:]])
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def _check_images(x, name: str) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 1 or shape[1] != shape[2]:
        raise ValueError(f"{name} must be images [n, s, s, 1], got shape {shape}")


def _check_choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
