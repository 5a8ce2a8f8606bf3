"""Moved to ``medrobust_screen.signing`` (the TensorFlow-free device package); this import path stays for existing code.

The name is the very same module object (not a copy), so attributes set on it reach the code that uses them.
"""

import sys

import medrobust_screen.signing

sys.modules[__name__] = medrobust_screen.signing
