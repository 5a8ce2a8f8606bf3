"""python -m export bundle|verify|keygen|sign (see export.bundle, export.verify and medrobust_screen.signing;
`--help` on each)."""

from __future__ import annotations

from medrobust import cli


def bundle(run: str, out: str, quantize: str = "int8", onnx="false", data: str | None = None,
           calibration: int = 1000, int8_scope: str = "mixed", opset: int = 17, recalibrate="true",
           signing_key: str | None = None, passphrase_env: str | None = None, progress="true") -> dict:
    """Export a trained run as an edge bundle: screening.tflite (detector + classifier fused, threshold
    baked in), classifier.tflite, detector.tflite, *.onnx with --onnx true, manifest.json, and
    signature.json with --signing-key.

    Args:
      run: run folder (classifier.keras, config.json, detector/).
      out: bundle folder to write: new, empty, or an earlier bundle (only the files an export wrote are
        replaced; any other non-empty folder is refused).
      quantize: int8 (default: float32 I/O, int8 layers) | float16 | none (float32).
      onnx: true to also write ONNX models (float32, plus ONNX Runtime int8 with --quantize int8, same
        recipe as TFLite int8).
      data: source of the int8 calibration images (default: the data the run was trained on; its train
        split).
      calibration: number of int8 calibration images.
      int8_scope: mixed (default: int8 layers; float32 first and last layers and score arithmetic) | full (full-integer).
      opset: ONNX opset (>= 17).
      recalibrate: set the threshold of quantized models (TFLite, ONNX int8) again on their own clean
        validation scores (true by default; quantization shifts the anomaly score).
      signing_key: Ed25519 private key file (python -m export keygen) to sign the bundle with.
      passphrase_env: environment variable holding the signing key's passphrase, if it has one.
      progress: true | false: print what is being converted.
    """
    from export.bundle import bundle as run_bundle

    return run_bundle(run, out, quantize=quantize, onnx=onnx, data=data, calibration=calibration,
                      int8_scope=int8_scope, opset=opset, recalibrate=recalibrate, signing_key=signing_key,
                      passphrase_env=passphrase_env, progress=progress)


def keygen(out: str, passphrase_env: str | None = None) -> None:
    """Make an Ed25519 key pair for signing bundles: OUT (private key, file mode 0600: keep it off the
    devices) and OUT.pub (public key: give it to medrobust-screen --trusted-key). Never overwrites a file.

    Args:
      out: path of the private key to write (the public key goes to OUT.pub).
      passphrase_env: environment variable whose value encrypts the private key (recommended).
    """
    import os

    from medrobust_screen import signing

    passphrase = None
    if passphrase_env is not None:
        passphrase = os.environ.get(str(passphrase_env), "").encode("utf-8")
        if not passphrase:
            raise cli.UsageError(f"--passphrase-env: environment variable {passphrase_env} is not set or empty")
    try:
        private, public, fingerprint = signing.generate_keypair(str(out), passphrase)
    except signing.SignatureError as exc:
        raise cli.UsageError(str(exc)) from None
    print(f"wrote private key {private} ({'encrypted' if passphrase else 'NOT encrypted: keep it secret'}; "
          f"never copy it to a device) and public key {public}")
    print(f"key fingerprint {fingerprint}")
    print(f"sign:   python -m export sign --bundle BUNDLE --key {private}"
          + (f" --passphrase-env {passphrase_env}" if passphrase_env else ""))
    print(f"screen: medrobust-screen --bundle BUNDLE --trusted-key {public} IMAGES...")


def sign(bundle: str, key: str, passphrase_env: str | None = None) -> None:
    """Sign an exported bundle: checks every file against manifest.json, then writes signature.json
    (Ed25519 over the exact bytes of manifest.json, which lists the sha256 of every model file).

    Args:
      bundle: bundle folder written by `python -m export bundle`.
      key: Ed25519 private key file (python -m export keygen).
      passphrase_env: environment variable holding the key's passphrase, if it has one.
    """
    from export.bundle import load_signing_key, sign_bundle

    sign_bundle(bundle, load_signing_key(key, passphrase_env, option="--key"))


def verify(bundle: str, data: str | None = None, limit: int | None = None, run: str | None = None,
           eps: float = 0.004, pgd_steps: int = 10, square_queries: int = 300, square_limit: int = 100,
           seed: int = 0, min_top1_agreement: float | None = None, max_accuracy_drop: float | None = None,
           max_auroc_drop: float | None = None, min_flag_agreement: float | None = None, progress="true") -> dict:
    """Compare every exported model with its Keras original on the test split; print a table, the
    tolerances and a pass/fail verdict per file; write parity.json into the bundle; exit with status 1
    when a file fails its tolerances (defaults per precision: export.verify.TOLERANCES).

    Args:
      bundle: bundle folder.
      data: dataset to test on (default: the data the source run was trained on; its test split).
      limit: at most this many test images (seeded, class-stratified).
      run: the source run folder if it moved since the export.
      eps: L-inf budget of PGD (transfer) and Square Attack (on the TFLite classifier), [0, 1] scale.
      pgd_steps: PGD steps.
      square_queries: Square Attack queries per image (0 skips it).
      square_limit: number of images attacked by Square.
      seed: random seed (the --limit sample and the attacks).
      min_top1_agreement: tolerance override for every file: least top-1 agreement with Keras (0..1).
      max_accuracy_drop: tolerance override: largest accuracy drop against Keras (0..1).
      max_auroc_drop: tolerance override: largest drop of detection_auroc_all_pgd (clean vs all PGD images).
      min_flag_agreement: tolerance override: least agreement of the refer flags with Keras (0..1).
      progress: true | false: show progress.
    """
    from export.verify import verify as run_verify

    return run_verify(bundle, data=data, limit=limit, run=run, eps=eps, pgd_steps=pgd_steps,
                      square_queries=square_queries, square_limit=square_limit, seed=seed,
                      min_top1_agreement=min_top1_agreement, max_accuracy_drop=max_accuracy_drop,
                      max_auroc_drop=max_auroc_drop, min_flag_agreement=min_flag_agreement, progress=progress)


def main() -> None:
    cli.run({"bundle": bundle, "verify": verify, "keygen": keygen, "sign": sign})


if __name__ == "__main__":
    main()
