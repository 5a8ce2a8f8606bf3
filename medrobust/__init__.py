"""medrobust: adversarially robust retinal OCT screening with TensorFlow/Keras.

Importing the package is cheap and does not import TensorFlow; the sub-packages
that need it import it themselves.
"""

__version__ = "0.1.0"
