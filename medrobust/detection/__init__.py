"""UAD: unsupervised adversarial detection (autoencoder, feature, Mahalanobis and boundary scores).

    detector = Detector.fit(classifier, x_train, x_val, epochs=10, target_fpr=0.05)
    flags = detector.predict(x)            # bool [n]
    scores = detector.score(x)             # {'combined', *detector.parts}
    detector.save("runs/x/detector"); Detector.load("runs/x/detector", classifier)
"""

from medrobust.detection.autoencoder import build_autoencoder, train_autoencoder
from medrobust.detection.detector import (ALL_PARTS, COMBINATIONS, DEFAULT_PARTS, PARTS, SCORE_NAMES, Detector,
                                         train_detector)

__all__ = ["Detector", "train_detector", "build_autoencoder", "train_autoencoder", "PARTS", "SCORE_NAMES",
           "COMBINATIONS", "ALL_PARTS", "DEFAULT_PARTS"]
