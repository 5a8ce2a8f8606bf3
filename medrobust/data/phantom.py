"""Deterministic SYNTHETIC retinal OCT B-scan phantoms.

These images are computer-generated, NOT real OCT scans, and carry no clinical
meaning. They only mimic the look of a B-scan (dark vitreous, bright layered
retina, darker choroid) and a caricature of each class's hallmark, so the
toolkit can be exercised offline where OCTMNIST cannot be downloaded:

- CNV: hyper-reflective sub-RPE lesion lifting the RPE, dark fluid pocket above;
- DME: dark intra-retinal cystoid spaces and retinal thickening;
- DRUSEN: several small dome-shaped elevations of the RPE, no fluid;
- NORMAL: none.

Anatomy, pathology size/position/strength, speckle and contrast all vary, and
some lesions are subtle, so the classes are learnable but not trivially
separable. Images are drawn at a working resolution of up to 4x the output
(capped at 128 px unless the output is larger) and area-averaged down.

Speed (measured): 6000 images at 28x28 take about 2 s of CPU time on one core.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medrobust.classes import CLASSES

CNV, DME, DRUSEN, NORMAL = (CLASSES.index(c) for c in ("CNV", "DME", "DRUSEN", "NORMAL"))

# Neurosensory retina from the inner limiting membrane (u=0) to the photoreceptor
# outer segments (u=1): (upper boundary in u, mean reflectivity).
_LAYERS = np.array([
    (0.00, 0.70),  # nerve fibre layer
    (0.12, 0.50),  # ganglion cell layer
    (0.22, 0.62),  # inner plexiform layer
    (0.34, 0.30),  # inner nuclear layer
    (0.44, 0.55),  # outer plexiform layer
    (0.52, 0.16),  # outer nuclear layer
    (0.84, 0.45),  # external limiting membrane
    (0.86, 0.25),  # myoid zone
    (0.90, 0.85),  # ellipsoid zone
    (0.95, 0.35),  # outer segments
])
_TABLE_LEN, _PAD = 128, 16  # layer look-up table samples; zero padding on each side
_LAYER_OF_SAMPLE = np.searchsorted(_LAYERS[:, 0], (np.arange(_TABLE_LEN) + 0.5) / _TABLE_LEN) - 1
_MAX_CYSTS, _MAX_DRUSEN, _MAX_SHADOWS = 8, 6, 3
_CHUNK = 16


def _working_factor(image_size: int) -> int:
    return max(1, min(4, 128 // image_size))


def _draw_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """All per-image random parameters, drawn for every image whatever its label,
    so the same seed gives the same anatomy and noise under any labelling."""
    u = rng.uniform
    # Lesion strength: about a quarter of lesions are subtle.
    strength = np.where(rng.random(n) < 0.25, u(0.2, 0.45, n), u(0.45, 1.0, n))
    n_cysts = np.ceil(u(0.25, 1.0, n) * (1 + 7 * strength))
    n_drusen = np.ceil(u(0.3, 1.0, n) * (1 + 5 * strength))
    return dict(
        strength=strength,
        rpe0=u(0.52, 0.74, n), thick=u(0.20, 0.30, n), tilt=u(-0.2, 0.2, n), curv=u(-0.3, 0.6, n),
        wave_amp=u(0.0, 0.01, n), wave_freq=u(1.0, 3.0, n), wave_phase=u(0, 2 * np.pi, n),
        fovea_x=0.5 + u(-0.12, 0.12, n), fovea_w=u(0.05, 0.10, n), pit=u(0.3, 0.65, n),
        layer_gain=u(0.8, 1.2, (n, len(_LAYERS))),
        rpe_int=u(0.9, 1.2, n), rpe_th=u(0.013, 0.02, n),
        chor_int=u(0.15, 0.35, n), chor_decay=u(0.05, 0.12, n), chor_tex=rng.random((n, 6, 10)),
        shadow_x=u(0.1, 0.9, (n, _MAX_SHADOWS)), shadow_w=u(0.004, 0.015, (n, _MAX_SHADOWS)),
        shadow_depth=u(0.2, 0.6, (n, _MAX_SHADOWS)) * (rng.random((n, _MAX_SHADOWS)) < 0.5),
        background=u(0.0, 0.06, n), speckle=u(0.4, 0.8, n), gain=u(0.85, 1.2, n), gamma=u(0.8, 1.25, n),
        cnv_dx=u(-0.15, 0.15, n), cnv_w=u(0.06, 0.16, n), cnv_h=u(0.03, 0.09, n) * strength,
        cnv_fluid=u(0.03, 0.08, n) * np.sqrt(strength), cnv_int=u(0.7, 1.1, n),
        cyst_on=np.arange(_MAX_CYSTS) < n_cysts[:, None], cyst_dx=rng.normal(0, 0.12, (n, _MAX_CYSTS)),
        cyst_u=u(0.3, 0.8, (n, _MAX_CYSTS)), cyst_ru=u(0.08, 0.2, (n, _MAX_CYSTS)),
        cyst_rx=u(0.025, 0.07, (n, _MAX_CYSTS)) * (0.4 + 0.6 * strength[:, None]),
        dme_thick=u(0.15, 0.5, n) * strength,
        drusen_dx=u(-0.3, 0.3, (n, _MAX_DRUSEN)), drusen_w=u(0.035, 0.08, (n, _MAX_DRUSEN)),
        drusen_h=u(0.03, 0.06, (n, _MAX_DRUSEN)) * np.sqrt(strength[:, None]) * (
            np.arange(_MAX_DRUSEN) < n_drusen[:, None]),
        drusen_int=u(0.4, 0.65, n),
    )


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights resampling a coarse grid to n_out points."""
    pos = np.linspace(0, n_in - 1, n_out)
    return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(n_in)[None, :])).astype(np.float32)


def _render(p: dict[str, np.ndarray], y: np.ndarray, size: int) -> np.ndarray:
    """Noise-free reflectivity [c, size, size] of one chunk at working resolution.

    Per-column quantities are [c, 1, size] so they broadcast against depth z [1, size, 1].
    """
    c = len(y)
    col = lambda a: np.asarray(a, np.float32).reshape(c, 1, -1)  # noqa: E731
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, z = g[None, None, :], g[None, :, None]  # x: column, z: depth (0 = top)
    is_cnv, is_dme, is_drusen = (col(y == k) for k in (CNV, DME, DRUSEN))

    def domes(centre, half_width, height):  # sum of smooth (parabolic) bumps; parameters [c, k]
        r = (x[..., None] - centre[:, None, None, :]) / half_width[:, None, None, :]
        return (height[:, None, None, :] * np.clip(1 - r**2, 0, None)).sum(-1)

    # Anatomy: RPE line, its elevation by drusen / CNV, sub-retinal fluid, retinal thickness.
    xc = x - 0.5
    rpe0 = col(p["rpe0"]) + col(p["tilt"]) * xc + col(p["curv"]) * xc**2 + col(p["wave_amp"]) * np.sin(
        2 * np.pi * col(p["wave_freq"]) * x + col(p["wave_phase"]))
    fovea_x = p["fovea_x"][:, None]
    fovea = np.exp(-(((x - col(fovea_x)) / col(p["fovea_w"])) ** 2))
    macula = np.exp(-(((x - col(fovea_x)) / 0.22) ** 2))
    drusen = is_drusen * domes(fovea_x + p["drusen_dx"], p["drusen_w"], p["drusen_h"])
    cnv_x, cnv_w = fovea_x + p["cnv_dx"][:, None], p["cnv_w"][:, None]
    cnv = is_cnv * domes(cnv_x, cnv_w, p["cnv_h"][:, None])
    fluid = is_cnv * domes(cnv_x, 1.3 * cnv_w, p["cnv_fluid"][:, None])
    elevation = drusen + cnv + fluid
    rpe = rpe0 - drusen - cnv
    rpe_th = col(p["rpe_th"])
    outer = rpe - rpe_th - fluid  # bottom of the neurosensory retina
    pit = col(p["pit"]) * fovea * (1 - 0.7 * is_dme * col(p["strength"]))
    # The inner surface follows only part of the RPE elevation: the outer retina is compressed.
    ilm = rpe0 - rpe_th - 0.3 * elevation - col(p["thick"]) * (1 + is_dme * col(p["dme_thick"]) * macula) * (
        1 - pit)
    ilm = np.minimum(ilm, outer - 0.03)  # a large lesion under the pit must not invert the retina

    # Neurosensory retina: per-image layer table indexed by normalised depth u (0 at
    # the ILM, 1 at the outer segments), zero-padded so u outside [0, 1] reads 0.
    u = (z - ilm) * (1 / (outer - ilm))
    # Near the fovea the inner layers are squeezed towards the pit floor (w(u) =
    # u (1 + b) / (1 + b u) keeps 0 and 1 fixed and has slope 1 + b at u = 0).
    b = 2.5 * pit
    t = np.clip(u, -0.02, 1.02)
    idx = (t * ((1 + b) * _TABLE_LEN) / (1 + b * t) + _PAD).astype(np.int32)
    table = np.zeros((c, _TABLE_LEN + 2 * _PAD), np.float32)
    table[:, _PAD:-_PAD] = ndimage.gaussian_filter1d((_LAYERS[:, 1] * p["layer_gain"])[:, _LAYER_OF_SAMPLE], 1.5)
    idx += np.arange(0, table.size, table.shape[1], dtype=np.int32)[:, None, None]
    img = table.ravel()[idx]

    # DME cysts live in (x, u) coordinates so they always sit inside the retina.
    dme = np.flatnonzero(y == DME)
    if dme.size:
        pd = {k: p[k][dme][:, :, None, None] for k in ("cyst_on", "cyst_dx", "cyst_u", "cyst_ru", "cyst_rx")}
        ud = u[dme]
        holes = np.zeros_like(ud)
        for k in range(int(pd["cyst_on"].sum(1).max())):
            dx = (x - fovea_x[dme, :, None] - pd["cyst_dx"][:, k]) / pd["cyst_rx"][:, k]
            dx2 = np.where(pd["cyst_on"][:, k], dx * dx, np.inf)  # per column; inf for switched-off cysts
            du = (ud - pd["cyst_u"][:, k]) * (1 / pd["cyst_ru"][:, k])
            holes = np.maximum(holes, 1 - (du * du + dx2))
        img[dme] *= 1 - 0.92 * np.sqrt(np.clip(holes, 0, 1))

    # RPE band, sub-RPE material (CNV bright and mottled, drusen medium), choroid.
    texture = 0.5 + _interp_matrix(size, p["chor_tex"].shape[1]) @ p["chor_tex"] @ _interp_matrix(
        size, p["chor_tex"].shape[2]).T
    img += col(p["rpe_int"]) * np.exp(-(((z - rpe) * (1 / rpe_th)) ** 2))
    under_rpe = (z > rpe) & (z < rpe0 + rpe_th + 0.4 * cnv)  # a CNV lesion also bulges downwards
    cnv_int = (y == CNV) * p["cnv_int"]
    material = col((y == DRUSEN) * p["drusen_int"] + 0.2 * cnv_int) + col(0.8 * cnv_int) * texture
    np.maximum(img, under_rpe * material, out=img)
    # Choroid reflectivity decays exponentially below Bruch's membrane; the
    # exponential factorises into a depth part and a column part.
    decay = 1 / col(p["chor_decay"])
    bruch = rpe0 + rpe_th
    img += (z > bruch) * (np.exp(-z * decay) * (col(p["chor_int"]) * np.exp(bruch * decay))) * texture
    # Shadows cast by superficial retinal vessels darken everything beneath them.
    shadow = domes(p["shadow_x"], p["shadow_w"], p["shadow_depth"]).clip(0, 0.8)
    img *= 1 - (z > ilm + 0.03) * shadow
    return img


def make_phantom(n: int, image_size: int = 28, seed: int = 0,
                 labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic OCT B-scans: x float32 [n, image_size, image_size, 1] in [0, 1], y int64 [n].

    Classes are balanced (round-robin, then shuffled) unless `labels` is given.
    The same arguments always give bitwise identical arrays (for a given numpy).
    Anatomy, lesion parameters and noise depend on the seed only, not on the
    labels, so `labels=np.full(n, c)` with one seed gives matched pairs that
    differ only by the pathology.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        y = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    else:
        y = np.asarray(labels, dtype=np.int64)
        if y.shape != (n,) or (n and (y.min() < 0 or y.max() >= len(CLASSES))):
            raise ValueError(f"labels must be {n} integers in [0, {len(CLASSES)})")
    p = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in _draw_params(rng, n).items()}
    k = _working_factor(image_size)
    x = np.empty((n, image_size, image_size, 1), np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        c = sl.stop - sl.start
        pc = {key: v[sl] for key, v in p.items()}
        img = _render(pc, y[sl], k * image_size).reshape(c, image_size, k, image_size, k).mean(axis=(2, 4))
        # Unit-mean multiplicative speckle: a blend of 1 and fully developed speckle
        # (exponential at working resolution, so Gamma(k*k) / (k*k) after area
        # averaging, drawn directly at output resolution), then a little optical blur.
        a = pc["speckle"][:, None, None]
        img *= 1 - a + a / (k * k) * rng.standard_gamma(k * k, img.shape, dtype=np.float32)
        img = ndimage.gaussian_filter(img, (0, 0.6, 0.6), truncate=3.0)
        gain, gamma, bg = (pc[key][:, None, None] for key in ("gain", "gamma", "background"))
        x[sl, ..., 0] = np.clip(bg + gain * np.clip(img, 0, None) ** gamma, 0, 1)
    return x, y


def phantom_splits(image_size: int = 28, n_train: int = 4000, n_val: int = 800, n_test: int = 800,
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (x, y), 'val': (x, y), 'test': (x, y)} drawn from independent child
    seeds of `seed`, so the splits never share an image."""
    children = np.random.SeedSequence(seed).spawn(3)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {name: make_phantom(m, image_size, int(ss.generate_state(1, np.uint64)[0]))
            for (name, m), ss in zip(sizes.items(), children)}
