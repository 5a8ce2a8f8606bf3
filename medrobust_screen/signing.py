"""Bundle signatures: Ed25519 (RFC 8032, through `cryptography`) over the exact bytes of manifest.json.

    python -m export keygen --out keys/publisher            # keys/publisher (private, 0600) + keys/publisher.pub
    python -m export sign --bundle bundles/NAME --key keys/publisher
    medrobust-screen --bundle bundles/NAME --trusted-key keys/publisher.pub scans/

What a signature covers: manifest.json lists the sha256 of every model file, the threshold, the classes,
the preprocessing and the source run, so one signature over its bytes binds all of them to the key.
The runtime checks the signature with the public key the operator passes (never a key shipped inside
the bundle), then every file's sha256 against the signed manifest, then that the threshold the
manifest states is the one baked into screening.tflite. See docs/security.md for what this does and
does not cover, and why this is not OpenSSF model-signing.

The signed message is ``SIGNED_PREFIX + manifest bytes`` (a fixed prefix keeps a medrobust signature
from being valid for anything else made with the same key). ``signature.json`` holds the algorithm,
the signed file's sha256, the signing key's fingerprint (informational: verification uses only the
trusted key) and the base64 signature.

Imports only the standard library; `cryptography` is imported when a key is used (it is a dependency
of both the full and the light screening install).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import os

SIGNATURE = "signature.json"
SIGNATURE_FORMAT = "medrobust-bundle-signature"
SIGNATURE_FORMAT_VERSION = 1
ALGORITHM = "Ed25519"
SIGNED_FILE = "manifest.json"
SIGNED_PREFIX = b"medrobust-bundle-signature-v1\n"


class SignatureError(ValueError):
    """A key or signature that cannot be used, or a signature that does not verify (one-line reason)."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("signatures need the cryptography package: pip install cryptography") from None
    return serialization, ed25519


def fingerprint(public_key) -> str:
    """'SHA256:<base64>' of the raw 32-byte public key (the form `ssh-keygen -l` prints)."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii").rstrip("=")


def generate_keypair(out, passphrase: bytes | None = None) -> tuple[str, str, str]:
    """Write a new Ed25519 key pair: `out` (private key, PEM PKCS#8, file mode 0600, encrypted with
    `passphrase` when given) and `out`.pub (public key, PEM SubjectPublicKeyInfo). Refuses to overwrite
    either file. Returns (private path, public path, fingerprint)."""
    serialization, ed25519 = _crypto()
    private_path, public_path = os.fspath(out), os.fspath(out) + ".pub"
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise SignatureError(f"{path} already exists; refusing to overwrite a key (choose another --out)")
    folder = os.path.dirname(os.path.abspath(private_path))
    if not os.path.isdir(folder):
        raise SignatureError(f"--out: folder {folder} does not exist")
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o666)  # the umask decides, as for any new file
    except BaseException:
        os.unlink(private_path)
        raise
    return private_path, public_path, fingerprint(key.public_key())


def _write_new(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_private_key(path, passphrase: bytes | None = None):
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise SignatureError(f"{path}: {exc} (see --passphrase-env)") from None
    except ValueError as exc:
        if b"PUBLIC KEY" in data:
            raise SignatureError(f"{path}: this is a public key; sign with the private key (without .pub)") from None
        reason = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise SignatureError(f"{path}: not a usable PEM private key ({reason}; wrong passphrase?)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 private key "
                             "(make one with python -m export keygen)")
    return key


def load_public_key(path):
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        if b"PRIVATE KEY" in data:
            raise SignatureError(f"{path}: this is a private key; pass the public key (.pub) as the trusted "
                                 "key, and keep the private key off the device") from None
        raise SignatureError(f"{path}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def _read_key_file(path, kind: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except FileNotFoundError:
        raise SignatureError(f"{path}: no such {kind} key file") from None
    except IsADirectoryError:
        raise SignatureError(f"{path}: is a folder, not a {kind} key file") from None
    except PermissionError:
        raise SignatureError(f"{path}: permission denied") from None
    return data


def sign_manifest(manifest_bytes: bytes, private_key, created: str | None = None) -> dict:
    """The signature.json document for these manifest bytes."""
    signature = private_key.sign(SIGNED_PREFIX + manifest_bytes)
    return {
        "format": SIGNATURE_FORMAT,
        "format_version": SIGNATURE_FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "signed_file": SIGNED_FILE,
        "signed_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "key_fingerprint": fingerprint(private_key.public_key()),
        "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def read_signature(bundle_dir) -> dict | None:
    """signature.json of a bundle (checked for shape), or None when the bundle has none."""
    path = os.path.join(os.fspath(bundle_dir), SIGNATURE)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 16).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"{path}: not a {SIGNATURE_FORMAT} document")
    if doc.get("format_version") != SIGNATURE_FORMAT_VERSION or doc.get("algorithm") != ALGORITHM \
            or doc.get("signed_file") != SIGNED_FILE:
        raise SignatureError(f"{path}: unsupported signature (format_version {doc.get('format_version')!r}, "
                             f"algorithm {doc.get('algorithm')!r}, signed file {doc.get('signed_file')!r})")
    if not isinstance(doc.get("signature"), str):
        raise SignatureError(f"{path}: no signature value")
    return doc


def verify_manifest(bundle_dir, manifest_bytes: bytes, public_key) -> dict:
    """Check signature.json against the trusted public key over exactly `manifest_bytes` (the bytes the
    caller then parses). Returns {'status': 'verified', 'key_fingerprint', 'signed': created}; raises
    SignatureError with a one-line reason otherwise."""
    from cryptography.exceptions import InvalidSignature

    doc = read_signature(bundle_dir)
    if doc is None:
        raise SignatureError(f"{os.fspath(bundle_dir)}: the bundle is not signed (no {SIGNATURE}); sign it with "
                             "python -m export sign, or screen it with --allow-unsigned")
    trusted = fingerprint(public_key)
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{SIGNATURE}: the signature is not base64") from None
    try:
        public_key.verify(signature, SIGNED_PREFIX + manifest_bytes)
    except InvalidSignature:
        signer = doc.get("key_fingerprint")
        why = (f"it says it was signed by key {signer}, not by the trusted key {trusted}" if signer != trusted
               else f"{SIGNED_FILE} or {SIGNATURE} was changed after signing")
        raise SignatureError(f"{os.fspath(bundle_dir)}: the bundle signature does not verify with the trusted key "
                             f"({why}); refusing the bundle") from None
    return {"status": "verified", "key_fingerprint": trusted, "signed": doc.get("created")}
