"""Moved to ``medrobust_screen.images`` (the TensorFlow-free device package); this import path stays for existing code.

The name is the very same module object (not a copy), so attributes set on it reach the code that uses them.
"""

import sys

import medrobust_screen.images

sys.modules[__name__] = medrobust_screen.images
