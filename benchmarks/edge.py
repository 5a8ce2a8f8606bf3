"""Edge benchmark: int8 screening model vs float TFLite vs Keras, sizes, and medrobust-screen throughput.

    python benchmarks/edge.py [--run runs/NAME] [--images FOLDER] [--repeats 300] [--json out.json]
    python benchmarks/edge.py --dicom-only --bundle bundles/NAME [--volume-repeats 10]   (no TensorFlow)

Without --run it trains a throwaway run first (phantom, standard, 1 epoch, the default width-32
small CNN, with the UAD detector when medrobust.detection provides one). A run without detector/
gets a stand-in detector (the UAD autoencoder, reconstruction-MSE score) so the fused model has the
same shape of graph. Everything runs on 1 thread: LiteRT with num_threads=1, TensorFlow with one
intra-op and one inter-op thread. Prints the CPU (model, vector extensions) and the load average first,
then one table; goals: int8 screening.tflite <= 0.3x the float32 size, >= 20x faster per image than
Keras `model.predict` on one image.

Sizes: the run is exported twice, as the default int8 bundle and as a float32 bundle (--quantize none),
and every .tflite file of one is compared with the same file of the other (and the three together);
then where the bytes of each screening.tflite go (export.tflite_size: constants by tensor type, the
largest constants, quantization parameters and names, metadata).

DICOM volumes: 49-B-scan OCT volumes are written with pydicom from real Kermany test B-scans (the frames
come from different patients: real B-scans, not a real volume; random frames, said SYNTHETIC, if the data
is absent) -- 512x496 uncompressed 8-bit, 512x496 JPEG Baseline, 1024x496 JPEG Baseline -- and screened
in-process with the bundle's int8 screening model (medrobust_screen.volume.screen_volume), in a subprocess pinned
to one CPU core, LiteRT num_threads=1, after one warm-up volume (start-up, bundle check and model load
excluded). Prints the median time per volume for decoding (to display grey levels), decoding +
preprocessing, the interpreter alone, and the whole screening; goal: < 0.5 s per volume.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

# This checkout's packages (export, medrobust, medrobust_screen), not whichever one the environment installed.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))

REAL_DATA = Path(os.environ.get("MEDROBUST_DATA", "/nonexistent")) / "oct2017_subset"
if not REAL_DATA.is_dir():
    REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "oct2017_subset"
if not REAL_DATA.is_dir():
    REAL_DATA = Path("/work/shared/data/oct2017_subset")


class AutoencoderStandIn:
    """The UAD autoencoder with a reconstruction-MSE score, for runs trained without a detector."""

    def __init__(self, x_train, image_size: int, epochs: int = 1):
        from medrobust.detection.autoencoder import build_autoencoder, train_autoencoder

        self.autoencoder = build_autoencoder(image_size)
        train_autoencoder(self.autoencoder, x_train, epochs=epochs)
        rec = self.autoencoder.predict(x_train[:500], verbose=0)
        self.threshold = float(np.quantile(np.mean((rec - x_train[:500]) ** 2, axis=(1, 2, 3)), 0.95))

    def score_model(self):
        import keras
        from keras import ops

        inp = keras.Input(self.autoencoder.input_shape[1:], name="image")
        return keras.Model(inp, {"combined": ops.mean(ops.square(self.autoencoder(inp) - inp), axis=(1, 2, 3))})


def cpu_report() -> list[str]:
    """benchmarks/attacks.py's CPU lines (model, vector extensions, oneDNN setting); imports no TensorFlow."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_attacks", Path(__file__).resolve().parent / "attacks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_report()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - no getloadavg
        return "unknown"


def size_table(int8_bundle: Path, float_bundle: Path) -> dict:
    """{file: {'int8': bytes, 'float32': bytes, 'ratio'}} for the .tflite files both bundles hold, plus
    'all .tflite' (their sums), and the breakdown of each screening.tflite."""
    from export.tflite_size import breakdown

    rows = {}
    for path in sorted(int8_bundle.glob("*.tflite")):
        other = float_bundle / path.name
        if other.exists():
            a, b = path.stat().st_size, other.stat().st_size
            rows[path.name] = {"int8": a, "float32": b, "ratio": a / b}
    if not rows:
        raise RuntimeError(f"{int8_bundle} and {float_bundle} hold no .tflite file in common")
    a, b = sum(r["int8"] for r in rows.values()), sum(r["float32"] for r in rows.values())
    rows["all .tflite"] = {"int8": a, "float32": b, "ratio": a / b}
    details = {}
    for label, bundle in (("int8", int8_bundle), ("float32", float_bundle)):
        d = breakdown((bundle / "screening.tflite").read_bytes())
        d["largest"] = [{"tensor": n, "type": t, "shape": sh, "bytes": size} for n, t, sh, size in d["largest"]]
        details[label] = d
    return {"files": rows, "screening_breakdown": details}


def print_sizes(sizes: dict) -> None:
    from export.tflite_size import format_breakdown

    print("\nsizes, int8 bundle against the float32 bundle of the same run (goal <= 0.3x)")
    for name, r in sizes["files"].items():
        print(f"  {name:18s} {r['int8'] / 1024:8.1f} KiB / {r['float32'] / 1024:8.1f} KiB = {r['ratio']:.3f}x   "
              f"{'met' if r['ratio'] <= 0.3 else 'NOT met'}")
    for label, d in sizes["screening_breakdown"].items():
        rows = [(x["tensor"], x["type"], x["shape"], x["bytes"]) for x in d["largest"]]
        for line in format_breakdown(f"  {label} screening.tflite", {**d, "largest": rows}, top=4):
            print(line)


def _median_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def _tflite_latency(content: bytes, x: np.ndarray, repeats: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(x.shape))
    interpreter.allocate_tensors()
    outputs = [d["index"] for d in interpreter.get_output_details()]

    def once():
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        for o in outputs:
            interpreter.get_tensor(o)

    return _median_ms(once, repeats)


def _train_run(out: Path, width: int) -> None:
    have_detector = _has_detector()
    cmd = [sys.executable, "-m", "medrobust.train", "--data", "phantom", "--method", "standard",
           "--label-fraction", "1.0", "--epochs", "1", "--width", str(width), "--out", str(out),
           "--progress", "false", "--detector", "true" if have_detector else "false"]
    print(f"training a throwaway run: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)


def _has_detector() -> bool:
    try:
        from medrobust.detection import Detector  # noqa: F401
    except ImportError:
        return False
    return True


def _screen_throughput(bundle: Path, folder: Path, copies: int, public_key: Path) -> dict:
    """Images/s of medrobust-screen (a subprocess, 1 thread; signature, sha256 and threshold checks
    included) over `copies` copies of `folder`."""
    with tempfile.TemporaryDirectory(prefix="medrobust-bench-") as tmp:
        tree = Path(tmp) / "images"
        for i in range(copies):
            shutil.copytree(folder, tree / f"copy{i}")
        cmd = [sys.executable, "-m", "medrobust_screen"]  # this checkout's runtime (the console script may be another's)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + ["--bundle", str(bundle), "--trusted-key", str(public_key), str(tree),
                                     "--out", str(Path(tmp) / "r.csv")], capture_output=True, text=True,
                              cwd=REPO)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    match = re.search(r"screened (\d+) files.*\(([\d.]+) s, ([\d.]+) images/s\)", proc.stderr)
    n, seconds, rate = int(match.group(1)), float(match.group(2)), float(match.group(3))
    return {"images": n, "images_per_s": rate, "screen_seconds": seconds, "wall_seconds_with_startup": wall,
            "wall_images_per_s": n / wall}


VOLUME_FRAMES = 49
KERMANY_TEST = REAL_DATA.parent / "kermany" / "test"


def _volume_frames(width: int) -> tuple[list[Path], str]:
    """49 real 8-bit grey B-scans of `width` x 496 from the Kermany test split (sorted), or [] if absent."""
    from PIL import Image

    found = []
    for path in sorted(KERMANY_TEST.glob("*/*.jpeg")) if KERMANY_TEST.is_dir() else []:
        with Image.open(path) as img:
            if img.size == (width, 496) and img.mode == "L":
                found.append(path)
        if len(found) == VOLUME_FRAMES:
            return found, f"{VOLUME_FRAMES} real Kermany test B-scans ({width}x496)"
    return [], "SYNTHETIC random frames"


def _write_volume(path: Path, width: int, jpeg: bool) -> str:
    """A 49-frame Ophthalmic Tomography DICOM file; returns where its frames came from."""
    import io

    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    from medrobust_screen.dicom import OPHTHALMIC_TOMOGRAPHY

    sources, origin = _volume_frames(width)
    if sources:
        encoded = [p.read_bytes() for p in sources]
        pixels = np.stack([np.asarray(Image.open(p)) for p in sources])
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (VOLUME_FRAMES, 496, width), dtype=np.uint8)
        encoded = []
        for frame in pixels:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, "JPEG", quality=90)
            encoded.append(buf.getvalue())
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = OPHTHALMIC_TOMOGRAPHY
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds.Modality, ds.ImageLaterality = "OPT", "R"
    if jpeg:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 496, width, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfFrames = VOLUME_FRAMES
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
    else:
        ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)
    return origin


def dicom_volume_benchmark(bundle: Path, repeats: int) -> dict:
    """Median seconds per 49-frame volume (see the module docstring); runs without TensorFlow."""
    from medrobust_screen import dicom
    from medrobust_screen.screener import Screener
    from medrobust_screen.volume import screen_volume

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU core
    screener = Screener(bundle, threads=1, allow_unsigned=True)  # a speed figure: who signed it does not matter
    size = screener.image_size
    results = {}
    with tempfile.TemporaryDirectory(prefix="medrobust-dicom-") as tmp:
        for label, width, jpeg in (("512x496 uncompressed", 512, False), ("512x496 JPEG Baseline", 512, True),
                                   ("1024x496 JPEG Baseline", 1024, True)):
            path = Path(tmp) / f"{width}_{'jpeg' if jpeg else 'native'}.dcm"
            origin = _write_volume(path, width, jpeg)
            rows = list(screen_volume(screener, str(path)))  # warm-up (and check it screened)
            assert rows[-1]["frames"] == VOLUME_FRAMES and rows[-1]["error_frames"] == 0, rows[-1]
            frames = [x for _, x in dicom.open_volume(path).iter_frames(size)]

            def seconds(fn):
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                return float(np.median(times))

            results[label] = {
                "frames": VOLUME_FRAMES, "source": origin, "file_bytes": path.stat().st_size,
                "decode_s": seconds(lambda: list(dicom.open_volume(path).iter_display_frames())),
                "decode_preprocess_s": seconds(lambda: list(dicom.open_volume(path).iter_frames(size))),
                "interpreter_s": seconds(lambda: [screener.predict(x) for x in frames]),
                "screen_volume_s": seconds(lambda: list(screen_volume(screener, str(path)))),
            }
    return {"image_size": size, "repeats": repeats, "goal_s": 0.5, "volumes": results,
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def print_dicom(figures: dict) -> None:
    print(f"\nDICOM OCT volume, {VOLUME_FRAMES} B-scans, int8 screening.tflite at {figures['image_size']} px, "
          f"1 core, 1 thread, start-up excluded (median of {figures['repeats']})")
    print(f"  {'volume':24s} {'decode':>9s} {'+preproc':>9s} {'interp.':>9s} {'screen':>9s}   goal < 0.5 s")
    for label, v in figures["volumes"].items():
        print(f"  {label:24s} {v['decode_s']:8.3f}s {v['decode_preprocess_s']:8.3f}s {v['interpreter_s']:8.3f}s "
              f"{v['screen_volume_s']:8.3f}s   {'met' if v['screen_volume_s'] < 0.5 else 'NOT met'} "
              f"({v['screen_volume_s'] / 0.5:.2f}x of the budget; {v['source']})")


def _dicom_subprocess(bundle: Path, repeats: int) -> dict:
    """The DICOM benchmark in a fresh process (no TensorFlow loaded, its own CPU affinity)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--dicom-only", "--bundle", str(bundle), "--volume-repeats",
                        str(repeats), "--json", out.name, "--quiet-table"], check=True)
        return json.loads(Path(out.name).read_text())


def main(argv=None) -> int:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="trained run folder (default: train a throwaway one)")
    parser.add_argument("--width", type=int, default=32, help="small CNN width of the throwaway run")
    parser.add_argument("--images", help="folder of images for medrobust-screen (default: the real scans)")
    parser.add_argument("--copies", type=int, default=3, help="copies of the image folder to screen")
    parser.add_argument("--repeats", type=int, default=300, help="timed single-image runs per TFLite model")
    parser.add_argument("--keras-repeats", type=int, default=30, help="timed Keras predict calls")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--dicom-only", action="store_true",
                        help="only the DICOM volume benchmark, with --bundle (imports no TensorFlow)")
    parser.add_argument("--bundle", help="bundle folder for --dicom-only")
    parser.add_argument("--volume-repeats", type=int, default=10, help="timed runs per DICOM volume")
    parser.add_argument("--quiet-table", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dicom_only:
        if not args.bundle:
            parser.error("--dicom-only needs --bundle")
        if not args.quiet_table:
            for line in cpu_report():
                print(line)
            print(f"load average at the start (1, 5, 15 min): {load_average()}", flush=True)
        figures = dicom_volume_benchmark(Path(args.bundle), args.volume_repeats)
        figures["load_average_end"] = load_average()
        if not args.quiet_table:
            print_dicom(figures)
            print(f"load average at the end: {figures['load_average_end']}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0

    for line in cpu_report():
        print(line)
    load_before = load_average()
    print(f"load average at the start (1, 5, 15 min): {load_before}", flush=True)
    from medrobust.cli import import_tensorflow

    tf = import_tensorflow()  # without TensorFlow's CPU start-up noise (cuInit)

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from medrobust.data import load_data
    from medrobust.io import read_run_config
    from medrobust.models import load_classifier

    from export import screening
    from export.bundle import export_bundle, load_detector
    from medrobust_screen.signing import generate_keypair

    with tempfile.TemporaryDirectory(prefix="medrobust-edge-") as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else tmp / "run"
        if not args.run:
            _train_run(run, args.width)
        config = read_run_config(run)
        size = int(config["image_size"])
        data = load_data(config.get("data", "phantom"), image_size=size, seed=int(config.get("seed", 0)))
        classifier = load_classifier(run / "classifier.keras")
        if (run / "detector").exists():
            detector, kind = load_detector(run, classifier), "UAD detector"
        else:
            detector, kind = AutoencoderStandIn(data["train"][0][:2000], size), "stand-in (autoencoder MSE)"
        print(f"run {run}: {classifier.count_params()} classifier parameters; detector: {kind}", flush=True)

        bundle = tmp / "bundle"
        private_key, public_key, _ = generate_keypair(tmp / "throwaway-key")
        export_bundle(run, bundle, quantize="int8", data=data, detector=detector, signing_key=private_key,
                      log=lambda m: None)
        float_bundle = tmp / "bundle-float32"
        export_bundle(run, float_bundle, quantize="none", data=data, detector=detector, log=lambda m: None)
        sizes = size_table(bundle, float_bundle)
        fused = screening.screening_model(classifier, detector)
        float_tflite = (float_bundle / "screening.tflite").read_bytes()
        int8_tflite = (bundle / "screening.tflite").read_bytes()
        clf_int8 = (bundle / "classifier.tflite").stat().st_size
        clf_float = (float_bundle / "classifier.tflite").stat().st_size

        x = data["test"][0][:1]
        lat_int8 = _tflite_latency(int8_tflite, x, args.repeats)
        lat_float = _tflite_latency(float_tflite, x, args.repeats)
        lat_keras = _median_ms(lambda: fused.predict(x, verbose=0), args.keras_repeats, warmup=3)
        call = tf.function(lambda t: fused(t, training=False))
        xt = tf.constant(x)
        lat_keras_call = _median_ms(lambda: [v.numpy() for v in call(xt).values()], args.repeats)
        lat_clf_predict = _median_ms(lambda: classifier.predict(x, verbose=0), args.keras_repeats, warmup=3)

        folder = Path(args.images) if args.images else REAL_DATA
        if not folder.is_dir():
            from PIL import Image

            folder = tmp / "generated"
            folder.mkdir()
            rng = np.random.default_rng(0)
            for i in range(90):
                Image.fromarray(rng.integers(0, 256, (496, 512), dtype=np.uint8)).save(folder / f"scan_{i}.jpeg")
        throughput = _screen_throughput(bundle, folder, args.copies, Path(public_key))
        started = time.perf_counter()
        from medrobust_screen.screener import Screener

        Screener(bundle, trusted_key=public_key)
        open_ms = 1000 * (time.perf_counter() - started)
        dicom_figures = _dicom_subprocess(bundle, args.volume_repeats)

    figures = {
        "cpu": cpu_report(), "load_average_start": load_before, "load_average_end": load_average(),
        "sizes": sizes,
        "keras": keras.__version__, "tensorflow": tf.__version__, "image_size": size,
        "classifier_params": int(classifier.count_params()), "detector": kind,
        "size_bytes": {"screening_int8": len(int8_tflite), "screening_float32": len(float_tflite),
                       "classifier_int8": clf_int8, "classifier_float32": clf_float},
        "size_ratio_int8_over_float32": len(int8_tflite) / len(float_tflite),
        "latency_ms_1_thread": {"tflite_int8_screening": lat_int8, "tflite_float32_screening": lat_float,
                                "keras_predict_screening": lat_keras, "keras_predict_classifier": lat_clf_predict,
                                "keras_compiled_call_screening": lat_keras_call},
        "speedup_int8_vs_keras_predict": lat_keras / lat_int8,
        "speedup_int8_vs_tflite_float32": lat_float / lat_int8,
        "medrobust_screen": {**throughput, "folder": str(folder), "copies": args.copies,
                             "bundle_open_ms_signature_sha256_threshold_checks": open_ms},
        "dicom_volume": dicom_figures,
    }
    t = figures["latency_ms_1_thread"]
    print("\nedge benchmark (1 thread, one image per call, median)")
    print(f"  int8 screening.tflite          {t['tflite_int8_screening']:9.3f} ms")
    print(f"  float32 screening.tflite       {t['tflite_float32_screening']:9.3f} ms")
    print(f"  Keras model.predict (fused)    {t['keras_predict_screening']:9.3f} ms   "
          f"(classifier alone {t['keras_predict_classifier']:.3f} ms)")
    print(f"  Keras compiled call (fused)    {t['keras_compiled_call_screening']:9.3f} ms")
    print(f"  speed-up int8 vs Keras predict {figures['speedup_int8_vs_keras_predict']:9.1f}x   (goal >= 20x)")
    print(f"  speed-up int8 vs float TFLite  {figures['speedup_int8_vs_tflite_float32']:9.2f}x")
    s = figures["size_bytes"]
    print(f"  size int8 / float32            {s['screening_int8'] / 1024:.1f} KiB / {s['screening_float32'] / 1024:.1f} "
          f"KiB = {figures['size_ratio_int8_over_float32']:.2f}x   (goal <= 0.3x)")
    print(f"  classifier.tflite int8/float32 {s['classifier_int8'] / 1024:.1f} KiB / {s['classifier_float32'] / 1024:.1f} "
          f"KiB = {s['classifier_int8'] / s['classifier_float32']:.2f}x")
    m = figures["medrobust_screen"]
    print(f"  medrobust-screen               {m['images_per_s']:9.1f} images/s over {m['images']} images "
          f"({m['wall_images_per_s']:.1f} images/s counting start-up and the bundle checks)")
    print(f"  bundle checks at start-up      {m['bundle_open_ms_signature_sha256_threshold_checks']:9.1f} ms   "
          "(signature, sha256 of every file, threshold probe, model load)")
    print_sizes(sizes)
    print_dicom(dicom_figures)
    print(f"\nload average (1, 5, 15 min): {load_before} at the start, {figures['load_average_end']} at the end")
    if args.json:
        from medrobust.io import atomic_write_json

        atomic_write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
