"""medrobust-screen: the TensorFlow-free edge runtime of medrobust, as its own light distribution.

    pip install ./edge        # on the device; from a clone of the repository

Installs the `medrobust-screen` command and the whole `medrobust_screen` package (every module in
it: there is no list of modules to keep up to date), with numpy, Pillow, the LiteRT interpreter,
cryptography and pydicom: no TensorFlow, so pip reports no conflict (the full `medrobust`
distribution requires TensorFlow). The package is the repository's own folder (one copy of the
code); it imports nothing outside itself, and tests/test_runtime.py checks that it imports no
TensorFlow and that this distribution ships every one of its modules.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent.parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "medrobust" / "__init__.py").read_text()).group(1)
REQUIRES = ["numpy>=1.26", "pillow>=10.0", "ai-edge-litert>=1.2", "cryptography>=42", "pydicom>=3.0,<3.1"]

setup(
    name="medrobust-screen",
    version=VERSION,
    description="medrobust-screen: screen retinal OCT scans with a signed medrobust edge bundle (LiteRT, no TensorFlow).",
    python_requires=">=3.10",
    package_dir={"": ".."},
    packages=find_packages(where=str(ROOT), include=["medrobust_screen", "medrobust_screen.*"]),
    install_requires=REQUIRES,
    # JPEG Lossless / JPEG-LS / 12-bit JPEG DICOM, as in the full distribution (pylibjpeg-libjpeg is GPL-3).
    extras_require={"dicom-lossless": ["pylibjpeg>=2.0,<3", "pylibjpeg-libjpeg>=2.1,<3"]},
    entry_points={"console_scripts": ["medrobust-screen=medrobust_screen.cli:main"]},
)
