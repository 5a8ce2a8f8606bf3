"""Cross-check our PGD-L-inf and APGD-CE against IBM ART's implementations on the same model and images.

Both libraries attack the same Keras model (inference mode) on 512 held-out phantom scans at an eps
where robust accuracy is informative (between 20% and 80%); robust accuracies must agree within
2 percentage points. ART wraps the model in TensorFlowV2Classifier(clip_values=(0, 1)) with
SparseCategoricalCrossentropy(from_logits=True).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from medrobust.attacks import APGD, PGD, accuracy, robust_accuracy
from medrobust.data.phantom import make_phantom
from medrobust.models import build_classifier

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "PyTorch not found" and similar import-time notices
    pytest.importorskip("art")
    from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

N_IMAGES = 512
EPS = 0.006  # L-inf, pixel scale: robust accuracy ~35-45% for this model (clean ~80%)
TOLERANCE = 0.02


def _train_tiny_cnn() -> keras.Model:
    """Same recipe as tests/test_attacks.py: small_cnn width 8, 3000 phantom scans, 5 epochs, cosine lr."""
    keras.utils.set_random_seed(0)
    x, y = make_phantom(3000, 28, seed=1)
    model = build_classifier("small_cnn", 28, width=8)
    schedule = keras.optimizers.schedules.CosineDecay(5e-3, decay_steps=5 * -(-3000 // 128))
    model.compile(keras.optimizers.Adam(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, batch_size=128, verbose=0)
    return model


@pytest.fixture(scope="module")
def setup():
    model = _train_tiny_cnn()
    x, y = make_phantom(N_IMAGES, 28, seed=2)
    clean = accuracy(model, x, y)
    assert clean >= 0.5, "the model failed to train"
    art_model = TensorFlowV2Classifier(
        model, nb_classes=4, input_shape=x.shape[1:],
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True), clip_values=(0.0, 1.0))
    return model, art_model, x, y, clean


@pytest.mark.slow
def test_pgd_linf_agrees_with_art(setup, report):
    model, art_model, x, y, clean = setup
    keras.utils.set_random_seed(0)
    steps, rel_step = 10, 0.25  # step size 0.25 * eps, one random start in the eps-cube
    ours = robust_accuracy(model, PGD(model, steps=steps, step_size=rel_step), x, y, EPS, batch_size=N_IMAGES,
                           progress=False)
    art_attack = ProjectedGradientDescent(art_model, norm=np.inf, eps=EPS, eps_step=rel_step * EPS, max_iter=steps,
                                          num_random_init=1, batch_size=N_IMAGES, verbose=False)
    theirs = accuracy(model, art_attack.generate(x, y), y)
    report(f"PGD-10 L-inf eps={EPS} on {N_IMAGES} images: clean {clean:.3f}, robust ours {ours:.3f} "
           f"vs ART {theirs:.3f} (diff {100 * (ours - theirs):+.1f} points)")
    assert 0.2 <= ours <= 0.8, "eps no longer gives an informative robust accuracy; retune EPS"
    assert abs(ours - theirs) <= TOLERANCE


@pytest.mark.slow
def test_apgd_ce_agrees_with_art(setup, report):
    model, art_model, x, y, clean = setup
    keras.utils.set_random_seed(0)
    steps = 100
    ours = robust_accuracy(model, APGD(model, steps=steps, loss="ce"), x, y, EPS, batch_size=N_IMAGES,
                           progress=False)
    # ART's APGD takes the initial step explicitly; the paper's (and ours) is 2 * eps.
    art_attack = AutoProjectedGradientDescent(art_model, norm=np.inf, eps=EPS, eps_step=2 * EPS, max_iter=steps,
                                              nb_random_init=1, batch_size=N_IMAGES, loss_type="cross_entropy",
                                              verbose=False)
    theirs = accuracy(model, art_attack.generate(x, y), y)
    report(f"APGD-CE-100 L-inf eps={EPS} on {N_IMAGES} images: clean {clean:.3f}, robust ours {ours:.3f} "
           f"vs ART {theirs:.3f} (diff {100 * (ours - theirs):+.1f} points)")
    assert 0.2 <= ours <= 0.8, "eps no longer gives an informative robust accuracy; retune EPS"
    assert abs(ours - theirs) <= TOLERANCE
