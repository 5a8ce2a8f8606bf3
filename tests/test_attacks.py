"""Tests for medrobust.attacks: FGSM, PGD, APGD, Carlini-Wagner L2 and Square Attack.

Invariants (eps-ball, [0, 1], shape/dtype, per-image eps) are checked on an untrained tiny CNN with
hypothesis; strength orderings on a small CNN trained for a few epochs on synthetic phantom scans.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medrobust.attacks import (
    APGD,
    FMN,
    PGD,
    CarliniWagnerL2,
    SquareAttack,
    accuracy,
    attack_batches,
    cross_entropy,
    dlr,
    fgsm,
    predict_labels,
)
from medrobust.attacks.apgd import checkpoints
from medrobust.attacks.losses import misclassified
from medrobust.data.phantom import make_phantom
from medrobust.models import build_classifier

TOL = 1e-6  # float32 rounding of x + delta
BATCH = 128
EPS = 0.006  # L-inf: PGD-10 fools ~60% of the batch, clean errors (~18%) included
EPS_L2 = 0.1  # L2: PGD-L2-50 fools ~65%


def train_tiny_cnn(n_train: int = 3000, epochs: int = 5, seed: int = 0) -> keras.Model:
    """small_cnn (width 8, 28x28) trained a few epochs on phantom scans (~70-85% held-out accuracy).

    The learning rate decays to 0 (cosine): with a constant rate the BatchNorm moving statistics lag
    the fast-changing weights and inference-mode accuracy swings between epochs (down to chance).
    """
    keras.utils.set_random_seed(seed)
    x, y = make_phantom(n_train, 28, seed=1)
    model = build_classifier("small_cnn", 28, width=8)
    schedule = keras.optimizers.schedules.CosineDecay(5e-3, decay_steps=epochs * -(-n_train // 128))
    model.compile(keras.optimizers.Adam(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=128, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained():
    model = train_tiny_cnn()
    x, y = make_phantom(BATCH, 28, seed=2)
    assert accuracy(model, x, y) >= 0.5, "the fixture model failed to train; attack-strength tests would be moot"
    return model, x, y


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(1)
    return build_classifier("small_cnn", 16, width=4)


def fooled(model, x_adv, y) -> np.ndarray:
    return np.asarray(misclassified(model(x_adv, training=False), y))


# -- invariants ----------------------------------------------------------------------------------

N_INV, SIZE_INV = 4, 16


@pytest.fixture(scope="module")
def all_attacks(tiny):
    """(name, attack, norm); one object each, so every attack is traced once for the whole test."""
    return [
        ("fgsm", fgsm(tiny), "linf"),
        ("pgd-linf", PGD(tiny, steps=3), "linf"),
        ("pgd-l2", PGD(tiny, steps=3, norm="l2"), "l2"),
        ("apgd-ce-linf", APGD(tiny, steps=4), "linf"),
        ("apgd-dlr-linf", APGD(tiny, steps=4, loss="dlr"), "linf"),
        ("apgd-ce-l2", APGD(tiny, steps=4, norm="l2", eot_iter=2), "l2"),
        ("apgd-dlr-l2", APGD(tiny, steps=4, loss="dlr", norm="l2", restarts=2), "l2"),
        ("cw-l2", CarliniWagnerL2(tiny, steps=4, binary_search_steps=2, lr=0.1), "l2"),
        ("fmn-linf", FMN(tiny, steps=4), "linf"),
        ("fmn-l2", FMN(tiny, norm="l2", steps=4), "l2"),
        ("square", SquareAttack(tiny, n_queries=8), "linf"),  # a Keras model, wrapped by the attack
    ]


def _check_invariants(name, x, x_adv, eps, norm):
    x_adv = np.asarray(x_adv)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32, name
    assert np.all(np.isfinite(x_adv)), name
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, name
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1))
    assert np.all(size <= eps + (TOL if norm == "linf" else 1e-5)), (name, size, eps)


eps_values = st.sampled_from([1e-4, 1 / 255, 0.01, 0.03, 0.1, 0.3])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), eps=st.lists(eps_values, min_size=N_INV, max_size=N_INV),
       saturate=st.floats(0.0, 0.6), scalar_eps=st.booleans())
def test_every_attack_stays_in_the_eps_ball_and_unit_box(all_attacks, seed, eps, saturate, scalar_eps):
    rng = np.random.default_rng(seed)
    x = rng.random((N_INV, SIZE_INV, SIZE_INV, 1), dtype=np.float32)
    # Many pixels exactly at 0 or 1, where clipping matters.
    mask = rng.random(x.shape) < saturate
    x[mask] = rng.integers(0, 2, size=int(mask.sum())).astype(np.float32)
    y = rng.integers(0, 4, N_INV)
    eps = np.full(N_INV, eps[0], np.float32) if scalar_eps else np.asarray(eps, np.float32)
    for name, attack, norm in all_attacks:
        e = eps * 10 if norm == "l2" else eps  # L2 radii are larger than L-inf ones
        x_adv = attack(x, y, e[0] if scalar_eps else e)
        _check_invariants(name, x, x_adv, e, norm)


def test_apgd_and_cw_do_not_retrace_over_an_eps_sweep(tiny):
    """eps is a tensor argument: a sweep over budgets reuses the compiled steps (compaction of a
    shrinking batch may add one shape-relaxed trace, never one per budget)."""
    x = np.random.default_rng(0).random((3, SIZE_INV, SIZE_INV, 1), dtype=np.float32)
    y = np.array([0, 1, 2])
    apgd = APGD(tiny, steps=2)
    cw = CarliniWagnerL2(tiny, steps=2, binary_search_steps=1)
    for eps in (0.01, 0.02, np.array([0.005, 0.01, 0.03], np.float32), 0.04, 0.05):
        apgd(x, y, eps)
        cw(x, y, eps)
    assert apgd._chunk.experimental_get_tracing_count() <= 2
    assert cw._chunk.experimental_get_tracing_count() == 1


def test_apgd_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]
    for steps in (2, 5, 10, 37):
        w = checkpoints(steps)
        assert w == sorted(set(w)) and 0 < w[0] and w[-1] <= steps


def test_bad_arguments_raise(tiny):
    with pytest.raises(ValueError):
        APGD(tiny, norm="l1")
    with pytest.raises(ValueError):
        APGD(tiny, loss="hinge")
    with pytest.raises(ValueError):
        CarliniWagnerL2(tiny, steps=0)
    with pytest.raises(ValueError):
        SquareAttack(tiny, n_queries=0)


# -- strength on a trained model -----------------------------------------------------------------

def test_fgsm_raises_the_loss(trained):
    model, x, y = trained
    x_adv = fgsm(model)(x, y, EPS)
    before = cross_entropy(model(x, training=False), y).numpy().mean()
    after = cross_entropy(model(x_adv, training=False), y).numpy().mean()
    assert after > before


def test_pgd_fools_at_least_as_many_as_fgsm(trained, report):
    model, x, y = trained
    keras.utils.set_random_seed(0)
    s_fgsm = fooled(model, fgsm(model)(x, y, EPS), y).sum()
    s_pgd = fooled(model, PGD(model, steps=10)(x, y, EPS), y).sum()
    report(f"eps={EPS}: fooled of {len(y)} (clean errors included): FGSM {s_fgsm}, PGD-10 {s_pgd}")
    assert s_pgd >= s_fgsm - 1


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", EPS_L2)])
def test_apgd_fools_at_least_as_many_as_pgd(trained, report, norm, eps):
    """Same loss, same number of steps: APGD's schedule must do at least as well as PGD's fixed step."""
    model, x, y = trained
    keras.utils.set_random_seed(0)  # random starts: deterministic per machine (the slack covers the rest)
    counts = {}
    for loss, loss_fn in (("ce", cross_entropy), ("dlr", dlr)):
        s_pgd = fooled(model, PGD(model, steps=50, norm=norm, loss_fn=loss_fn)(x, y, eps), y).sum()
        s_apgd = fooled(model, APGD(model, steps=50, loss=loss, norm=norm)(x, y, eps), y).sum()
        counts[loss] = (s_pgd, s_apgd)
        assert s_apgd >= s_pgd - 1, (loss, s_apgd, s_pgd)
    report(f"{norm} eps={eps}: fooled of {len(y)} (clean errors included): "
           + ", ".join(f"PGD-50-{k.upper()} {p} vs APGD-50-{k.upper()} {a}" for k, (p, a) in counts.items()))


def test_square_attack_lowers_accuracy_from_outputs_only(trained, monkeypatch, report):
    model, x, y = trained
    seen_types = set()
    call = tf.function(lambda b: tf.nn.softmax(model(b, training=False)), reduce_retracing=True)

    def predict_probs(batch):  # numpy in, numpy probabilities out: no gradient can flow through this
        seen_types.add(type(batch))
        return np.asarray(call(batch))

    predict_probs(x[:2])  # trace outside the no-gradient zone

    class NoTape:
        def __init__(self, *args, **kwargs):
            raise AssertionError("Square Attack took a gradient")

    monkeypatch.setattr(tf, "GradientTape", NoTape)
    attack = SquareAttack(predict_probs, n_queries=200, seed=0)
    x_adv, queries, success = attack.run(x, y, 0.02)
    monkeypatch.undo()

    assert seen_types == {np.ndarray}
    assert isinstance(x_adv, np.ndarray)
    _check_invariants("square", x, x_adv, np.full(len(x), 0.02, np.float32), "linf")
    clean, robust = accuracy(model, x, y), accuracy(model, x_adv, y)
    report(f"Square Attack eps=0.02, 200 queries: accuracy {clean:.3f} -> {robust:.3f}, "
           f"mean queries {queries.mean():.1f}")
    assert robust <= clean - 0.2
    assert queries.max() <= 200
    assert np.all(fooled(model, x_adv, y)[success])
    # Images fooled early stop spending queries; clean errors spend none.
    clean_wrong = predict_labels(model, x) != y
    assert np.all(queries[clean_wrong] == 0) and queries[~clean_wrong & success].mean() < 200


def test_cw_successes_are_misclassified_and_small(trained, report):
    model, x, y = trained
    x, y = x[:48], y[:48]
    # lr 0.01 (the paper's) jitters by more than this model's tiny minimal perturbations; 0.002 is tighter.
    cw = CarliniWagnerL2(model, steps=80, binary_search_steps=4, lr=0.002)
    x_adv, success, l2 = (np.asarray(v) for v in cw.find(x, y))
    assert np.all(fooled(model, x_adv, y)[success])
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.allclose(l2, np.sqrt(((x_adv - x) ** 2).sum(axis=(1, 2, 3))), atol=1e-4)
    # Minimal perturbations vs PGD-L2 at a few radii (reported, not asserted: "roughly smaller").
    correct = ~fooled(model, x, y)
    pgd = PGD(model, steps=20, norm="l2")
    rows = []
    for eps in (0.025, 0.05, 0.1):
        s_pgd = fooled(model, pgd(x, y, eps), y)[correct].mean()
        s_cw = (success & (l2 <= eps))[correct].mean()
        rows.append(f"eps={eps}: PGD-L2 {s_pgd:.2f} vs CW within eps {s_cw:.2f}")
    med = np.median(l2[success & correct]) if np.any(success & correct) else float("nan")
    report(f"CW-L2 success {success[correct].mean():.2f} on clean-correct, median L2 {med:.3f}; " + "; ".join(rows))
    projected = cw(x, y, eps=0.1)
    _check_invariants("cw", x, projected, np.full(len(x), 0.1, np.float32), "l2")


def test_early_stopped_pgd_keeps_every_image_it_fooled(trained):
    """PGD without random start is deterministic, and a run of k steps is the prefix of a longer run:
    every image fooled within k steps must still be fooled by what the longer run returns."""
    model, x, y = trained
    final = fooled(model, PGD(model, steps=12, random_start=False, early_stop=True)(x, y, EPS), y)
    for k in (1, 3, 6):
        early = fooled(model, PGD(model, steps=k, random_start=False, early_stop=True)(x, y, EPS), y)
        assert np.all(final[early]), k


@pytest.mark.parametrize("make", [lambda m, r: PGD(m, steps=5, restarts=r), lambda m, r: APGD(m, steps=10, restarts=r)],
                         ids=["pgd", "apgd"])
def test_restarts_do_not_lose_fooled_images(trained, make):
    model, x, y = trained
    keras.utils.set_random_seed(0)
    one = fooled(model, make(model, 1)(x, y, EPS / 2), y).sum()
    more = make(model, 3)(x, y, EPS / 2)
    assert fooled(model, more, y).sum() >= one - 1
    _check_invariants("restarts", x, more, np.full(len(x), EPS / 2, np.float32), "linf")


def test_objective_fn_reproduces_default_loss(trained):
    """Bit for bit, given the same network: the default loss runs on the model's frozen inference graph
    (medrobust.attacks.inference), so the objective calls that graph too (tests/test_inference.py
    compares it with the model's own call)."""
    model, x, y = trained
    attack = PGD(model, steps=5, random_start=False)
    default = attack(x, y, EPS)
    call, _ = attack.inference.current(x)
    assert call.kind != "model"
    custom = PGD(model, steps=5, random_start=False,
                 objective_fn=lambda xa, ya: cross_entropy(call(xa), ya))(x, y, EPS)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(custom))


@pytest.mark.parametrize("cls", [PGD, APGD])
def test_objective_and_success_fn_drive_a_targeted_attack(trained, cls):
    """objective_fn/success_fn replace the logits loss and misclassification (here: a targeted attack,
    as an adaptive attack on classifier + detector would use them). They see each image's own label:
    the attack drops finished images from the batch, so per-image data must come through y, not a
    closure over the whole batch."""
    model, x, y = trained
    target = (y + 1) % 4

    def objective(xa, ya):
        return -cross_entropy(model(xa, training=False), (ya + 1) % 4)

    def success(xa, ya):
        return tf.equal(tf.argmax(model(xa, training=False), -1, output_type=tf.int32), (ya + 1) % 4)

    attack = cls(model, steps=20, objective_fn=objective, success_fn=success)
    x_adv = attack(x, y, 0.03)
    hit = predict_labels(model, np.asarray(x_adv)) == target
    assert hit.mean() >= 0.8


@pytest.mark.parametrize("cls", [PGD, APGD])
def test_objective_may_return_its_success_from_the_same_pass(trained, cls):
    """objective_fn -> (loss, success) gives the same attack as objective_fn + success_fn."""
    model, x, y = trained

    def loss_only(xa, ya):
        return cross_entropy(model(xa, training=False), ya)

    def both(xa, ya):
        logits = model(xa, training=False)
        return cross_entropy(logits, ya), misclassified(logits, ya)

    kwargs = dict(steps=10, random_start=False) if cls is PGD else dict(steps=10)
    keras.utils.set_random_seed(0)
    a = cls(model, objective_fn=loss_only, success_fn=lambda xa, ya: misclassified(model(xa, training=False), ya),
            **kwargs)(x, y, EPS)
    keras.utils.set_random_seed(0)
    b = cls(model, objective_fn=both, **kwargs)(x, y, EPS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_driver_accepts_numpy_attacks(trained):
    model, x, y = trained
    out = attack_batches(SquareAttack(model, n_queries=5), x[:20], y[:20], 0.01, batch_size=8, progress=False)
    assert out.shape == x[:20].shape and out.dtype == np.float32
    assert np.abs(out - x[:20]).max() <= 0.01 + TOL


# -- nonsense in, an error out (issue 15, item 11) ------------------------------------------------

def _every_attack(model):
    return {"fgsm": fgsm(model), "pgd": PGD(model, steps=2), "apgd": APGD(model, steps=2),
            "cw": CarliniWagnerL2(model, steps=2, binary_search_steps=1), "fmn": FMN(model, steps=2),
            "square": SquareAttack(model, n_queries=2)}


@pytest.mark.parametrize("case", ["pixels_0_255", "negative_eps", "zero_eps", "eps_above_1", "nan_pixels",
                                  "label_out_of_range", "one_hot_labels", "eps_count"])
def test_attacks_refuse_nonsense_before_attacking(tiny, case):
    rng = np.random.default_rng(0)
    x = rng.random((4, 16, 16, 1), dtype=np.float32)
    y = np.array([0, 1, 2, 3])
    eps = 0.01
    if case == "pixels_0_255":
        x, eps = x * 255, 8.0  # PGD(clf)(x * 255, y, 8.0) used to run and report a robust accuracy
    elif case == "negative_eps":
        eps = -0.01
    elif case == "zero_eps":
        eps = 0.0
    elif case == "eps_above_1":
        eps = 1.5
    elif case == "nan_pixels":
        x[0, 0, 0, 0] = np.nan
    elif case == "label_out_of_range":
        y = np.array([0, 1, 2, 4])
    elif case == "one_hot_labels":
        y = np.eye(4)[y] * 0.9
    elif case == "eps_count":
        eps = np.full(3, 0.01, np.float32)
    for name, attack in _every_attack(tiny).items():
        if name in ("cw", "fmn") and case in ("negative_eps", "zero_eps", "eps_above_1", "eps_count"):
            continue  # their budget is an L2 radius (C&W) or they take none (FMN.find); checked below
        with pytest.raises(ValueError):
            attack(x, y, eps)
    if case in ("negative_eps", "zero_eps", "eps_count"):
        with pytest.raises(ValueError):
            CarliniWagnerL2(tiny, steps=2, binary_search_steps=1)(x, y, eps)


def test_l2_budgets_may_exceed_1_but_not_the_image_diagonal(tiny):
    x = np.random.default_rng(0).random((2, 16, 16, 1), dtype=np.float32)
    y = np.array([0, 1])
    PGD(tiny, steps=1, norm="l2")(x, y, 2.0)  # an L2 radius of 2 in a 256-pixel image is a real budget
    with pytest.raises(ValueError):
        PGD(tiny, steps=1, norm="l2")(x, y, 17.0)  # > sqrt(256): larger than the whole [0, 1] box


@pytest.fixture(scope="module")
def softmax_twin(trained):
    model, x, y = trained
    return keras.Model(model.input, keras.layers.Softmax()(model.output))


def test_probability_models_are_refused_by_logit_attacks(softmax_twin, trained):
    _, x, y = trained
    for attack in (APGD(softmax_twin, steps=5, loss="dlr"), CarliniWagnerL2(softmax_twin, steps=2),
                   FMN(softmax_twin, steps=2), PGD(softmax_twin, steps=2, loss_fn=dlr)):
        with pytest.raises(ValueError, match="probabilities"):
            attack(x[:8], y[:8], EPS)


def test_cross_entropy_attacks_on_a_probability_model_warn_and_match_the_logits_model(softmax_twin, trained, report):
    model, x, y = trained
    with pytest.warns(UserWarning, match="probabilities"):
        x_soft = APGD(softmax_twin, steps=20)(x, y, EPS)
    keras.utils.set_random_seed(0)
    x_soft = APGD(softmax_twin, steps=20).run(x, y, EPS)[0]
    keras.utils.set_random_seed(0)
    x_logit = APGD(model, steps=20).run(x, y, EPS)[0]
    on_soft, on_logits = accuracy(model, x_soft, y), accuracy(model, x_logit, y)
    report(f"APGD-CE-20 eps={EPS}: robust accuracy {on_logits:.3f} on the logits model, {on_soft:.3f} on its "
           "softmax twin (attacked through log-probabilities)")
    assert abs(on_soft - on_logits) <= 0.03


# -- minimum-norm attack --------------------------------------------------------------------------

@pytest.mark.parametrize("norm, grid", [("linf", (0.003, EPS, 0.012)), ("l2", (0.05, EPS_L2, 0.2))])
def test_fmn_curve_agrees_with_pgd_at_the_grid_points(trained, report, norm, grid):
    """One FMN run gives robust accuracy at every eps; at grid points it must be close to APGD-50's
    (a minimum-norm attack is usually a little weaker than a bounded attack at a fixed eps)."""
    model, x, y = trained
    keras.utils.set_random_seed(0)
    x_adv, norms = FMN(model, norm=norm, steps=100).find(x, y)
    found = np.isfinite(norms)
    assert np.all(fooled(model, x_adv, y)[found]) and np.all(x_adv[~found] == x[~found])
    diff = (x_adv - x).reshape(len(x), -1)
    measured = np.abs(diff).max(1) if norm == "linf" else np.sqrt((diff.astype(np.float64) ** 2).sum(1))
    np.testing.assert_allclose(norms[found], measured[found], rtol=1e-5, atol=1e-7)
    assert np.all(norms[~fooled(model, x, y) | found] >= 0) and np.all(norms[fooled(model, x, y)] == 0)
    rows = []
    for eps in grid:
        r_fmn = FMN.robust_accuracy(norms, eps)
        r_apgd = 1 - fooled(model, APGD(model, steps=50, norm=norm).run(x, y, eps)[0], y).mean()
        rows.append(f"eps={eps}: FMN {r_fmn:.3f} vs APGD-50 {r_apgd:.3f}")
        assert r_apgd - 0.03 <= r_fmn <= r_apgd + 0.08, rows[-1]
    report(f"FMN-{norm}-100 curve vs APGD-CE-50 at grid points ({len(y)} phantom images): " + "; ".join(rows))


# -- Ctrl-C (issue 15, item 6) ----------------------------------------------------------------------

class _Stop(Exception):
    pass


@pytest.mark.parametrize("make", [lambda m: PGD(m, steps=200_000), lambda m: APGD(m, steps=200_000),
                                  lambda m: FMN(m, steps=200_000),
                                  lambda m: CarliniWagnerL2(m, steps=200_000, binary_search_steps=1)],
                         ids=["pgd", "apgd", "fmn", "cw"])
def test_a_long_attack_stops_within_seconds_of_a_signal(tiny, make):
    """A signal handler only runs between compiled calls: attacks run their steps in short chunks, so an
    interrupt (here a timer raising an exception, as Ctrl-C raises KeyboardInterrupt) lands in seconds,
    not when the whole attack is done (minutes here)."""
    import signal
    import time

    x = np.random.default_rng(0).random((8, SIZE_INV, SIZE_INV, 1), dtype=np.float32)
    y = np.array([0, 1, 2, 3] * 2)
    attack = make(tiny)

    def stop(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        with pytest.raises(_Stop):
            attack(x, y, 0.001)
        stopped_after = time.perf_counter() - started - 3.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert stopped_after < 5.0, stopped_after
