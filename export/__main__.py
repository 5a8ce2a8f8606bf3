"""python -m export bundle|verify (see export.bundle and export.verify; `--help` on each)."""

from __future__ import annotations

from medrobust import cli


def bundle(run: str, out: str, quantize: str = "int8", onnx="false", data: str | None = None,
           calibration: int = 1000, int8_scope: str = "mixed", opset: int = 17, recalibrate="true",
           progress="true") -> dict:
    """Export a trained run as an edge bundle: screening.tflite (detector + classifier fused, threshold
    baked in), classifier.tflite, detector.tflite, *.onnx with --onnx true, and manifest.json.

    Args:
      run: run folder (classifier.keras, config.json, detector/).
      out: bundle folder to write (an existing bundle there is replaced).
      quantize: int8 (default: float32 I/O, int8 layers) | float16 | none (float32).
      onnx: true to also write ONNX models (float32, plus ONNX Runtime int8 with --quantize int8).
      data: source of the int8 calibration images (default: the data the run was trained on; its train
        split).
      calibration: number of int8 calibration images.
      int8_scope: mixed (default: int8 layers; float32 first layer and score arithmetic) | full (full-integer).
      opset: ONNX opset (>= 17).
      recalibrate: set the threshold of quantized TFLite models again on their own clean validation
        scores (true by default; quantization shifts the anomaly score).
      progress: true | false: print what is being converted.
    """
    from export.bundle import bundle as run_bundle

    return run_bundle(run, out, quantize=quantize, onnx=onnx, data=data, calibration=calibration,
                      int8_scope=int8_scope, opset=opset, recalibrate=recalibrate, progress=progress)


def verify(bundle: str, data: str | None = None, limit: int | None = None, run: str | None = None,
           eps: float = 0.004, pgd_steps: int = 10, square_queries: int = 300, square_limit: int = 100,
           seed: int = 0, progress="true") -> dict:
    """Compare every exported model with its Keras original on the test split; print a table and write
    parity.json into the bundle.

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
      progress: true | false: show progress.
    """
    from export.verify import verify as run_verify

    return run_verify(bundle, data=data, limit=limit, run=run, eps=eps, pgd_steps=pgd_steps,
                      square_queries=square_queries, square_limit=square_limit, seed=seed, progress=progress)


def main() -> None:
    cli.run({"bundle": bundle, "verify": verify})


if __name__ == "__main__":
    main()
