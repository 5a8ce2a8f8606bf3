"""A bundle's manifest.json, its signature and its files: the checks made before any model is loaded.

A bundle is refused (BundleError, one-line reason) at the first failure: a signature that does not
verify against the trusted key (see medrobust_screen.signing), a manifest without a field the runtime
relies on or with a field of the wrong type, a listed file that is missing or whose sha256 differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

from medrobust_screen.errors import BundleError, UsageError

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "medrobust-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: screening models expose their baked-in threshold; bundles may be signed
MIN_FORMAT_VERSION = 2

# Fields the runtime relies on; a manifest without one of them is refused.
REQUIRED_FIELDS = ("format", "format_version", "classes", "input", "preprocessing", "threshold", "models", "files")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest_bytes(bundle_dir) -> bytes:
    """The exact bytes of manifest.json (what a signature covers)."""
    bundle_dir = os.fspath(bundle_dir)
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    try:
        with open(os.path.join(bundle_dir, MANIFEST), "rb") as f:
            return f.read()
    except FileNotFoundError:
        partial = " (export-in-progress.json is there: the export was interrupted)" if os.path.exists(
            os.path.join(bundle_dir, "export-in-progress.json")) else ""
        raise BundleError(f"{bundle_dir}: no {MANIFEST}{partial}; not a bundle, or the export did not finish: "
                          "run python -m export bundle again") from None


def read_manifest(bundle_dir, raw: bytes | None = None) -> dict:
    """Parse and check manifest.json, or the given bytes of it (fields and types only; see `verify_files`
    for the files)."""
    bundle_dir = os.fspath(bundle_dir)
    raw = read_manifest_bytes(bundle_dir) if raw is None else raw
    path = os.path.join(bundle_dir, MANIFEST)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                          "the bundle is incomplete or from another tool")
    if manifest["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format is {manifest['format']!r}, expected {BUNDLE_FORMAT!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r} is not supported (this runtime reads "
                          f"{MIN_FORMAT_VERSION}..{BUNDLE_FORMAT_VERSION}); update medrobust")
    if version < MIN_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version} is too old (its threshold cannot be checked "
                          "against the model, and it cannot be signed); export the run again")
    _check_manifest_types(manifest, path)
    return manifest


def _field(manifest: dict, dotted: str, path: str):
    value = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise BundleError(f"{path}: missing field {dotted}")
        value = value[key]
    return value


def _check_manifest_types(m: dict, path: str) -> None:
    classes = m["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        raise BundleError(f"{path}: classes must be a list of class names")
    threshold = m["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise BundleError(f"{path}: threshold must be a finite number, got {threshold!r}")
    size = _field(m, "preprocessing.image_size", path)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BundleError(f"{path}: preprocessing.image_size must be a positive integer, got {size!r}")
    shape = _field(m, "input.shape", path)
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == [size, size, 1]):
        raise BundleError(f"{path}: input.shape must be [null, {size}, {size}, 1], got {shape!r}")
    if _field(m, "input.dtype", path) != "float32":
        raise BundleError(f"{path}: input.dtype must be float32")
    files = m["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: files must map file names to their sha256")
    for name, entry in files.items():
        if not plain_name(name):
            raise BundleError(f"{path}: file name {name!r} is not a plain file name inside the bundle")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.match(entry["sha256"]):
            raise BundleError(f"{path}: files.{name}.sha256 is missing or not a sha256 hex digest")
    screening = _field(m, "models.screening.file", path)
    if screening not in files:
        raise BundleError(f"{path}: models.screening.file {screening!r} is not listed in files")
    parts = m.get("detector", {}).get("parts") if isinstance(m.get("detector"), dict) else None
    if parts is not None:  # optional: bundles exported before the part_scores output have none
        names = [p.get("name") if isinstance(p, dict) else None for p in parts] if isinstance(parts, list) else None
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names) \
                or not all(isinstance(p.get("description", ""), str) for p in parts):
            raise BundleError(f"{path}: detector.parts must be a list of {{name, description}} with distinct names")
    if "referral" in m:  # optional: runs trained before the referral operating point have none
        t = _field(m, "referral.threshold", path)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise BundleError(f"{path}: referral.threshold must be a probability in [0, 1], got {t!r}")


def plain_name(name) -> bool:
    """A file name that stays inside the bundle folder (no path, not the manifest itself)."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name
            and "\\" not in name and "\x00" not in name)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(bundle_dir, manifest: dict) -> None:
    """Check the sha256 of every file the manifest lists; BundleError on the first mismatch."""
    bundle_dir = os.fspath(bundle_dir)
    for name, entry in manifest["files"].items():
        path = os.path.join(bundle_dir, name)
        if not os.path.isfile(path):
            raise BundleError(f"{bundle_dir}: {name} is listed in {MANIFEST} but missing; re-export the bundle")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{bundle_dir}: {name} does not match its sha256 in {MANIFEST} (changed or "
                              "corrupt file); refusing to load it, re-export or re-copy the bundle")


def check_signature(bundle_dir, raw_manifest: bytes, trusted_key=None, allow_unsigned: bool = False) -> dict:
    """The signature status of a bundle: {'status': 'verified', 'key_fingerprint', 'signed'} when
    `trusted_key` (a public key file) verifies signature.json over `raw_manifest`; {'status':
    'not verified', 'reason'} with `allow_unsigned` for a bundle without signature.json.
    UsageError for no key and no permission, or `allow_unsigned` on a signed bundle (a present
    signature is always checked); BundleError for a bad key, no signature, or a signature that
    does not verify."""
    from medrobust_screen import signing

    if trusted_key is not None and allow_unsigned:
        raise UsageError("--trusted-key and --allow-unsigned exclude each other")
    if trusted_key is None:
        if not allow_unsigned:
            raise UsageError("pass --trusted-key PUBLIC_KEY (the bundle publisher's public key) to check the "
                             "bundle's signature, or --allow-unsigned to screen without checking who made it")
        # A signed bundle is always checked: skipping the check would let anyone edit what the signature
        # protects (e.g. the referral threshold, which is not baked into a model) and screen with it.
        try:
            doc = signing.read_signature(bundle_dir)
        except signing.SignatureError as exc:
            raise BundleError(f"{exc}; a bundle that carries a signature must verify (--allow-unsigned is only "
                              "for bundles without one)") from None
        if doc is not None:
            raise UsageError(f"{os.fspath(bundle_dir)} is signed (key {doc.get('key_fingerprint', '?')}): pass "
                             "its publisher's public key with --trusted-key PUBLIC_KEY; --allow-unsigned only "
                             f"screens bundles without a {signing.SIGNATURE}")
        return {"status": "not verified", "reason": "--allow-unsigned; the bundle is not signed"}
    try:
        return signing.verify_manifest(bundle_dir, raw_manifest, signing.load_public_key(trusted_key))
    except signing.SignatureError as exc:
        raise BundleError(str(exc)) from None


def training_data(manifest: dict) -> dict:
    """What data the bundle's models were trained on, from the manifest's source_run:
    {'source': str | None, 'synthetic': bool | None, 'label': one line for outputs}."""
    run = manifest.get("source_run") if isinstance(manifest.get("source_run"), dict) else {}
    source = run.get("data_source") or run.get("data")
    synthetic = run.get("synthetic_data") if isinstance(run.get("synthetic_data"), bool) else None
    source_text = str(source) if source else "source not recorded"
    if synthetic:
        label = f"SYNTHETIC data ({source_text}): not for clinical use"
    elif synthetic is False:
        label = f"real scans ({source_text})"
    else:
        label = f"data of unknown kind ({source_text}; the manifest does not say whether it was synthetic)"
    return {"source": source, "synthetic": synthetic, "label": label}
