"""Models and runs several test modules build the same way (imported by the tests and by the scripts
the distributed tests run in a subprocess, where this folder is on sys.path too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def small_cnn(size: int, width: int = 8, sync_bn: bool = False, seed: int = 0):
    """The small CNN, seeded; with sync_bn=True a copy whose BatchNorm layers are synchronized (global
    batch statistics), so a replicated run can match a single-device one step for step."""
    import keras

    from medrobust.models import build_classifier

    keras.utils.set_random_seed(seed)
    model = build_classifier("small_cnn", size, width=width)
    if not sync_bn:
        return model

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def standard_trained_cnn(x, y, size: int, epochs: int, width: int = 16, seed: int = 0):
    """A small CNN after `epochs` of standard training (cross-entropy, Adam with a cosine decay, batch 64)."""
    import keras

    from medrobust.data.pipeline import steps_per_epoch, train_dataset
    from medrobust.training import make_trainer

    clf = small_cnn(size, width=width, seed=seed)
    steps = steps_per_epoch(len(x), 64)
    trainer = make_trainer("standard", clf)
    trainer.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, epochs * steps)))
    trainer.fit(train_dataset(x, y, 64, seed=seed), epochs=epochs, steps_per_epoch=steps, shuffle=False, verbose=0)
    return clf


def run_script(script: str, out: Path) -> dict:
    """Run a test module as a script (`python script OUT`, e.g. on two logical CPUs) and read OUT's JSON."""
    done = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(Path(out).read_text())
