"""The score graph of a Detector, in keras.ops only: differentiable (adaptive attacks, bit-depth squeezing
by BPDA) and exportable (a plain Keras graph for TFLite; filters are min/max networks and slices)."""

from __future__ import annotations

from keras import ops

from medrobust.detection import scores as S
from medrobust.detection.parts import (LOG_FLOORS, LOG_PARTS, MEDIAN_SQUEEZERS, RESIDUAL_DEFAULTS, STAT_PREFIX,
                                       pooled_parts)


class ScoreGraph:
    """Mixed into Detector: x -> its parts and combined score. Uses the detector's parts, config, stats,
    autoencoder and tap model (self._model, self._taps); `call(model, tensor)` runs a Keras model (with or
    without training=False)."""

    def _graph(self, x, call, with_part_scores: bool = False) -> dict:
        """{'combined', *parts (raw), 'logits'}; with_part_scores adds 'part_scores' [n, k]: each part's
        standardised score z (the scale the combination rule reads), in self.parts order, computed by the
        very ops the combined score uses (so a reader can see which part drove it)."""
        parts = self._parts_graph(x, call)
        c = self.config
        z, scaled = {}, {}
        for name in self.parts:
            mean, std = c["standardise"][name]
            v = S.log_score(parts[name] + LOG_FLOORS.get(name, 0.0)) if name in LOG_PARTS else parts[name]
            z[name] = (v - mean) / std
            scaled[name] = v
        rule = c["combination"]
        if rule == "sum":
            combined = sum(z[name] for name in self.parts)
        elif rule == "max_all":
            combined = ops.max(ops.stack([z[name] for name in self.parts], axis=1), axis=1)
        else:
            pooled = pooled_parts(self.parts, rule)
            anomaly = None
            if pooled:
                excess = sum(ops.relu(z[name]) for name in pooled)
                anomaly = (excess - c["anomaly"][0]) / c["anomaly"][1]
            if rule == "max" and "boundary" in self.parts:
                combined = z["boundary"] if anomaly is None else ops.maximum(z["boundary"], anomaly)
            else:
                combined = anomaly
        out = {"combined": combined, **{name: parts[name] for name in self.parts}, "logits": parts["logits"]}
        if with_part_scores:
            # The same z, written as v * (1 / std) - mean / std: a branch of its own off the scaled parts, so
            # the combined score's ops keep exactly their inputs and consumers (int8 conversion requantized a
            # z that also fed this output, which moved the combined score by a quantization step).
            out["part_scores"] = ops.stack([scaled[name] * (1.0 / c["standardise"][name][1])
                                            - c["standardise"][name][0] / c["standardise"][name][1]
                                            for name in self.parts], axis=1)
        return out

    def _parts_graph(self, x, call) -> dict:
        raw = self._raw_graph(x, call)
        out = {name: raw[name] for name in (*self.parts, "logits") if name != "feature"}
        if "feature" in self.parts:
            scales = self.config["feature_scales"]
            out["feature"] = raw["divergence"] / scales["divergence"] + raw["distance"] / scales["distance"]
        return out

    def _raw_graph(self, x, call) -> dict:
        """Every ingredient of the parts. The classifier runs once on x and once per extra input (the
        reconstruction, each squeezed image), all in one batched call."""
        parts, c = self.parts, self.config
        extra = []  # (name, image batch) run through the classifier along with x
        rec = None
        if self.autoencoder is not None:
            rec = call(self.autoencoder, x)
            if "feature" in parts:
                extra.append(("reconstruction", rec))
        if "squeeze_bits" in parts:
            extra.append(("squeeze_bits", S.bit_depth(x, c["squeeze_bits"])))
        if "squeeze_median" in parts:
            extra += [(q, S.SQUEEZERS[q](x)) for q in MEDIAN_SQUEEZERS]
        batch = x if not extra else ops.concatenate([x] + [v for _, v in extra], axis=0)
        outs = call(self._model, batch)
        k = 1 + len(extra)
        # [k * n, ...] -> k blocks of n; only x's block is needed for the feature maps.
        logits_all = ops.reshape(outs[0], (k, -1, outs[0].shape[-1]))
        logits = logits_all[0]
        features_all = ops.reshape(outs[1], (k, -1, outs[1].shape[-1]))
        features = features_all[0]
        block = {name: 1 + i for i, (name, _) in enumerate(extra)}  # which block of the batch holds what
        raw = {"logits": logits}
        if rec is not None:
            raw["reconstruction"] = S.reconstruction_error(x, rec)
        if "feature" in parts:
            raw["divergence"] = S.js_divergence(logits, logits_all[block["reconstruction"]])
            raw["distance"] = S.l2_distance(features, features_all[block["reconstruction"]])
        if "mahalanobis" in parts:
            raw["mahalanobis"] = S.mahalanobis_distance(features, self.stats["means"], self.stats["whitening"])
        for i, name in enumerate(self._taps):
            part, prefix = f"mahalanobis_{name}", STAT_PREFIX[f"mahalanobis_{name}"]
            pooled = ops.reshape(ops.mean(outs[2 + i], axis=(1, 2)), (k, -1, outs[2 + i].shape[-1]))[0]
            raw[part] = S.mahalanobis_distance(pooled, self.stats[prefix + "means"], self.stats[prefix + "whitening"])
        if "residual" in parts:
            raw["residual"] = S.dark_residual_energy(x, **c.get("residual", RESIDUAL_DEFAULTS))
        if "squeeze_bits" in parts:
            raw["squeeze_bits"] = S.squeeze_distance(logits, logits_all[block["squeeze_bits"]])
        if "squeeze_median" in parts:
            d2, d3 = (S.squeeze_distance(logits, logits_all[block[q]]) for q in MEDIAN_SQUEEZERS)
            raw["squeeze_median"] = ops.maximum(d2, d3)
        if "boundary" in parts:
            raw["boundary"] = S.boundary_closeness(logits, c["boundary_delta"])
        return raw
