"""The UAD autoencoder: a small convolutional denoising autoencoder for OCT B-scans.

Input and output are float32 [n, s, s, 1] images in [0, 1] (the classifier's input). The encoder
halves the resolution twice down to a narrow [s/4, s/4, latent] code; the decoder mirrors it and
ends in a sigmoid. Sizes that are not a multiple of 4 are zero-padded on the way in and cropped on
the way out, so any image_size works. With the defaults it has about 22k parameters at 28x28.

It is trained on clean images only (no labels) to rebuild x from x + Gaussian noise, so it learns
the look of clean scans rather than the identity; an adversarial perturbation, unlike the speckle it
was trained to ignore, is not reproduced faithfully, and off-distribution images are rebuilt badly.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers


def build_autoencoder(image_size: int = 28, width: int = 16, latent: int = 4,
                      name: str = "uad_autoencoder") -> keras.Model:
    """Conv encoder (width, 2*width, stride 2 twice) -> [s/4, s/4, latent] code -> mirrored decoder."""
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    inputs = keras.Input((image_size, image_size, 1), name="image")
    padded = 4 * math.ceil(image_size / 4)
    pad = padded - image_size
    h = inputs
    if pad:
        h = layers.ZeroPadding2D(((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)), name="pad")(h)
    h = layers.Conv2D(width, 3, padding="same", activation="relu", name="enc1")(h)
    h = layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu", name="enc2")(h)
    h = layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu", name="enc3")(h)
    h = layers.Conv2D(latent, 1, padding="same", activation="relu", name="code")(h)
    h = layers.Conv2DTranspose(2 * width, 3, strides=2, padding="same", activation="relu", name="dec1")(h)
    h = layers.Conv2DTranspose(width, 3, strides=2, padding="same", activation="relu", name="dec2")(h)
    h = layers.Conv2D(width, 3, padding="same", activation="relu", name="dec3")(h)
    h = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="reconstruction")(h)
    if pad:
        h = layers.Cropping2D(((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)), name="crop")(h)
    return keras.Model(inputs, h, name=name)


def train_autoencoder(autoencoder: keras.Model, x: np.ndarray, x_val: np.ndarray | None = None,
                      epochs: int = 10, batch_size: int = 64, noise_std: float = 0.03, lr: float = 2e-3,
                      seed: int = 0, verbose: int = 0) -> dict[str, list[float]]:
    """Fit `autoencoder` in place to rebuild clean x from x + N(0, noise_std^2) (clipped to [0, 1]).

    MSE loss, Adam with a cosine learning-rate decay. Returns the Keras history dict.
    """
    import tensorflow as tf

    x = np.asarray(x, np.float32)
    if len(x) < 2:
        raise ValueError("the autoencoder needs at least 2 training images")
    batch_size = max(1, min(batch_size, len(x)))
    steps = max(1, math.ceil(len(x) / batch_size))
    images = tf.constant(x)

    def noisy(step, i):  # a fresh, reproducible noise draw for every step
        clean = tf.gather(images, i)
        noise = tf.random.stateless_normal(tf.shape(clean), seed=tf.stack([step, tf.constant(seed, tf.int64)]),
                                           stddev=noise_std)
        return tf.clip_by_value(clean + noise, 0.0, 1.0), clean

    order = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    train = order.repeat().batch(batch_size).enumerate().map(noisy, num_parallel_calls=tf.data.AUTOTUNE)
    train = train.prefetch(tf.data.AUTOTUNE)
    val = None
    if x_val is not None and len(x_val):
        val = tf.data.Dataset.from_tensor_slices((x_val, x_val)).batch(256)
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps, alpha=0.05)
    autoencoder.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    history = autoencoder.fit(train, epochs=epochs, steps_per_epoch=steps, validation_data=val, shuffle=False,
                              verbose=verbose)
    return history.history
