"""The edge runtime moved to the medrobust_screen package (TensorFlow-free; ``pip install ./edge``).

    python -m export.runtime --bundle bundles/NAME ...      (the same command as medrobust-screen)

The names that were importable from here still are; new code imports from medrobust_screen.
"""

import sys

from medrobust_screen.cli import TRUSTED_KEY_ENV, build_parser, main  # noqa: F401
from medrobust_screen.errors import BundleError, UsageError  # noqa: F401
from medrobust_screen.inputs import check_inputs, iter_image_files  # noqa: F401
from medrobust_screen.manifest import (BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST, MIN_FORMAT_VERSION,  # noqa: F401
                                       REQUIRED_FIELDS, check_signature, read_manifest, read_manifest_bytes,
                                       sha256_file, training_data, verify_files)
from medrobust_screen.manifest import plain_name as _plain_name  # noqa: F401
from medrobust_screen.output import RUN_COLUMNS, output_format  # noqa: F401
from medrobust_screen.output import Sink as _Sink  # noqa: F401
from medrobust_screen.screener import (COLUMNS, OUTPUT_FLAG, OUTPUT_PROBABILITIES, OUTPUT_SCORE,  # noqa: F401
                                       OUTPUT_THRESHOLD, UNVERIFIED, VERDICT_CLASSIFY, VERDICT_ERROR, VERDICT_REFER,
                                       VERDICT_RULE, Screener)

if __name__ == "__main__":
    sys.exit(main())
