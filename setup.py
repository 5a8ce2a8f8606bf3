from setuptools import find_packages, setup

setup(
    name="medrobust",
    version="0.1.0",
    description="Adversarially robust retinal OCT screening: SSAT, UAD, system risk and edge export (TensorFlow/Keras).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["medrobust", "medrobust.*", "export", "export.*", "medrobust_screen",
                                    "medrobust_screen.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "tf2onnx>=1.17,<1.18",
        "onnx>=1.16",
        "onnxruntime>=1.20",
        "ai-edge-litert>=1.2",
        "numpy>=1.26",
        "scikit-learn>=1.4",
        "fire>=0.6",
        "matplotlib>=3.8",
        "pillow>=10.0",
        "tqdm>=4.66",
        # DICOM OCT volumes in medrobust-screen (medrobust_screen.dicom); JPEG Baseline/2000 decode through Pillow.
        "pydicom>=3.0,<3.1",
        "cryptography>=42",  # Ed25519 bundle signatures (medrobust_screen.signing)
    ],
    # The TensorFlow-free screening runtime (the medrobust_screen package) alone is its own distribution:
    # `pip install ./edge` (medrobust-screen; numpy, Pillow, ai-edge-litert, cryptography, pydicom).
    extras_require={
        # JPEG Lossless / JPEG-LS / 12-bit JPEG DICOM (pylibjpeg-libjpeg is GPL-3, hence optional).
        "dicom-lossless": ["pylibjpeg>=2.0,<3", "pylibjpeg-libjpeg>=2.1,<3"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5,<4",  # the suite runs on 2 workers (README, .ci/run)
            "hypothesis>=6.100",
            "adversarial-robustness-toolbox>=1.18",
        ],
    },
    entry_points={
        "console_scripts": [
            "medrobust-train=medrobust.train:main",
            "medrobust-evaluate=medrobust.evaluate:main",
            "medrobust-screen=medrobust_screen.cli:main",
        ],
    },
)
