"""Attack throughput: medrobust's PGD / APGD vs IBM ART, vs a bare eager gradient loop, and vs the machine.

    python benchmarks/attacks.py [--batch 128] [--size 28] [--width 32] [--repeats 5] [--jit] [--skip-art]

One model (the default small CNN, random weights: speed does not depend on training) and one batch
of phantom scans, L-inf eps = 4/255. Labels are the model's own predictions, so every image starts
correctly classified; ART only attacks such images, so both libraries do the full work on every
image. Our attacks run with early_stop=False for the same reason (early stopping only saves time).
Every attack is called once before timing (warm-up: tf.function tracing, our attacks' freezing of
the model and ART's own set-up are EXCLUDED); then the attacks are timed in interleaved rounds (load
from other processes hits all of them alike) and each figure is the median over --repeats rounds.
The first lines name the CPU, its vector extensions (AVX2 / AVX-512 / AMX / BF16), TensorFlow's oneDNN
setting and any cap on oneDNN's instruction set: ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU makes oneDNN
(the convolutions, pooling and matmuls) dispatch its AVX2 kernels, an emulation of an AVX2-only CPU (not
a real one: clock, caches and memory stay those of this CPU; TensorFlow's own Eigen kernels, compiled into
the wheel, run the same code either way). Speed figures hold for one instruction set: quote the CPU.
Prints images/s and ratios (with the range of the per-round ratios: how stable the median is):
  - PGD-10: ours vs ART ProjectedGradientDescent (max_iter=10, one random start);
  - PGD-10: ours vs a bare eager loop of 10 tf.GradientTape gradient evaluations (no sign, step,
    projection or bookkeeping), the floor for any 10-step gradient attack run eagerly;
  - APGD-100 (CE): ours vs ART AutoProjectedGradientDescent (max_iter=100, one start).
and how close each attack gets to the machine: GMAC/s = multiply-accumulates of the gradient
evaluations it did (counted by TensorFlow's profiler on the model's input-gradient graph: forward plus
the backward pass to the input, no weight gradients) per second, beside the peak of the same threads
on a large float32 matmul (2048 x 2048). Process CPU seconds are printed too: on a shared machine
wall time grows with other people's load, CPU time much less.
--jit adds our attacks compiled with XLA: on CPU they were 4-6x SLOWER than the default graph
(oneDNN kernels) in our runs, so jit_compile=True is for GPUs/TPUs.
--bf16 adds our attacks on a bfloat16 twin of the model (Keras mixed_bfloat16 policy, same weights, logits
in float32; oneDNN runs bf16 on AVX512_BF16/AMX CPUs), with the robust accuracy their adversaries leave on
the float32 model beside that of the float32 attacks: faster where the CPU has bf16 units, but a different
(lower-precision) attack, so the evaluation does not use it.
--compare-inference adds our attacks on the two slower forms of the model they can differentiate
(medrobust.attacks.inference): "frozen" (weights as constants, the graph not simplified beforehand) and
"model" (the Keras model called through its variables, as before), to show what each step buys.
--model PATH times a trained classifier (.keras) instead of the random-weight small CNN.
--op-profile prints where one input-gradient evaluation spends its time, op type by op type, and the
multiply-accumulate rate of the convolutions alone: the gap to the machine's limit.
--inter-op / --intra-op set TensorFlow's thread pools (default: TensorFlow's choice) to try other settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_rounds(fns: dict, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Warm up every fn once, then time them in `repeats` interleaved rounds; (wall, cpu) of each round."""
    for name, fn in fns.items():
        print(f"warming up {name} ...", file=sys.stderr, flush=True)
        fn()
    runs: dict[str, list] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            print(f"round {r + 1}/{repeats}: {name}", file=sys.stderr, flush=True)
            runs[name].append(timed(fn))
    return runs


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Warm up every fn once, then time them in `repeats` interleaved rounds; median (wall, cpu) each."""
    return medians(interleaved_rounds(fns, repeats))


def medians(runs: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    return {name: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for name, v in runs.items()}


def median_seconds(name: str, fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call (used by benchmarks/evaluate.py)."""
    print(f"timing {name} ...", file=sys.stderr, flush=True)
    fn()
    return statistics.median(timed(fn)[0] for _ in range(repeats))


# /proc/cpuinfo flags -> the names printed for them (vector extensions that decide which kernels run)
VECTOR_EXTENSIONS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"),
                     ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16"))
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN's cap on the kernels it dispatches


def cpu_report(cpuinfo: str | None = None, environ=None) -> list[str]:
    """Lines naming the CPU, its vector extensions, TensorFlow's oneDNN setting and any oneDNN ISA cap
    (from /proc/cpuinfo where there is one). A cap below the CPU's own instruction set makes this run an
    emulation of a CPU with only that set (oneDNN's convolutions and matmuls; TensorFlow's other kernels
    are compiled into the wheel and do not change), which the lines say."""
    import platform

    environ = os.environ if environ is None else environ
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if fields.get("cpu family") and fields.get("model"):  # virtual machines often hide the model name
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    if flags:
        have = [name for flag, name in VECTOR_EXTENSIONS if flag in flags]
        extensions = " ".join(have) if have else "none of AVX2 / AVX-512 / AMX"
        missing = [name for flag, name in VECTOR_EXTENSIONS[:3] + VECTOR_EXTENSIONS[5:6] if flag not in flags]
        if missing:
            extensions += f" (no {', no '.join(missing)})"
    else:
        extensions = "unknown (no /proc/cpuinfo flags)"
    lines = [f"CPU: {model}, {os.cpu_count()} logical CPUs; vector extensions: {extensions}"]
    setting = environ.get("TF_ENABLE_ONEDNN_OPTS")
    onednn = ("off" if setting is not None and setting.strip().lower() in ("0", "false", "off", "no")
              else "on")
    lines.append(f"TensorFlow oneDNN: {onednn} (TF_ENABLE_ONEDNN_OPTS="
                 + (setting if setting is not None else "unset: on by default on x86 Linux") + ")")
    caps = [(name, environ[name]) for name in ISA_CAP_VARIABLES if environ.get(name)]
    if caps:
        name, value = caps[0]
        emulated = value.strip().upper().startswith("AVX2") and "avx512f" in flags
        lines.append(f"oneDNN ISA cap: {name}={value}"
                     + (": AVX2 EMULATED by capping oneDNN on an AVX-512 CPU, not a real AVX2 machine"
                        if emulated else " (oneDNN dispatches no kernels above it)"))
    else:
        lines.append("oneDNN ISA cap: none (oneDNN uses the best kernels this CPU has)")
    return lines


def frozen_input_gradient(call, x_shape):
    """The graph of one cross-entropy input-gradient evaluation of call (image batch -> logits) on a batch
    of x_shape, with every variable frozen to a constant (a ConcreteFunction: inputs x, y; output the
    gradient)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from medrobust.attacks.losses import cross_entropy

    @tf.function
    def grad(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            loss = cross_entropy(call(x), y)
        return tape.gradient(loss, x)

    specs = tf.TensorSpec(tuple(x_shape)), tf.TensorSpec(tuple(x_shape[:1]), tf.int32)
    return convert_variables_to_constants_v2(grad.get_concrete_function(*specs))


def gradient_macs(model, image_shape) -> float:
    """Multiply-accumulates of one input-gradient evaluation (forward + backward to the input) of one
    image, from TensorFlow's profiler on the frozen gradient graph (flops / 2)."""
    import tensorflow as tf

    graph = frozen_input_gradient(lambda v: model(v, training=False), (1,) + tuple(image_shape)).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    level = tf.get_logger().level
    tf.get_logger().setLevel("ERROR")  # the v1 profiler's deprecation notices
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = tf.compat.v1.profiler.profile(graph=graph, options=options)
    finally:
        tf.get_logger().setLevel(level)
    return profile.total_float_ops / 2


def op_profile(model, x, y, macs: float, peak: float, runs: int = 10) -> None:
    """Print the time of one input-gradient evaluation of the batch, op type by op type, from TensorFlow's
    step statistics (a graph session with full tracing, on the graph our attacks differentiate), and the
    multiply-accumulate rate of the convolutions alone."""
    import collections

    import tensorflow as tf

    from medrobust.attacks.inference import ModelInference

    call, _ = ModelInference(model).current(x)  # frozen, as our attacks use it
    frozen = frozen_input_gradient(call, x.shape)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
    feeds = {frozen.inputs[0].name: x, frozen.inputs[1].name: y.astype(np.int32)}
    fetches = [t.name for t in frozen.outputs]
    per_type: collections.Counter = collections.Counter()
    with tf.compat.v1.Session(graph=graph) as session:
        for _ in range(3):
            session.run(fetches, feeds)
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(runs):
            metadata = tf.compat.v1.RunMetadata()
            session.run(fetches, feeds, options=options, run_metadata=metadata)
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    label = node.timeline_label.split("=")[-1].split("(")[0].strip() or node.node_name
                    per_type[label] += node.all_end_rel_micros / runs / 1e3
    total = sum(per_type.values())
    conv = sum(ms for op, ms in per_type.items() if "Conv2D" in op)
    print(f"one input-gradient evaluation of the batch, op by op (ms, summed over ops; {runs} traced runs):")
    for op, ms in per_type.most_common(8):
        print(f"  {op:<36}{ms:>8.2f}  {ms / total:>5.0%}")
    conv_gmacs = len(x) * macs / (conv / 1e3) / 1e9
    print(f"  convolutions: {conv:.1f} of {total:.1f} ms; {conv_gmacs:.0f} GMAC/s if they did all the model's "
          f"multiply-adds ({conv_gmacs / peak:.0%} of the matmul peak)")


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """GMAC/s of a float32 size x size matmul on TensorFlow's threads (best of `repeats`)."""
    import tensorflow as tf

    a = tf.random.uniform((size, size))
    mm = tf.function(lambda: tf.matmul(a, a))
    mm().numpy()
    best = min(timed(lambda: mm().numpy())[0] for _ in range(repeats))
    return size ** 3 / best / 1e9


def bfloat16_twin(model):
    """The same network under Keras' mixed_bfloat16 policy (bf16 compute, float32 weights), sharing the
    weights' values, with the last layer (the logits) kept in float32."""
    import keras

    last = model.layers[-1].name

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if layer.name == last else "mixed_bfloat16"
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


def art_classifier(model, input_shape):
    """IBM ART's wrapper of a Keras logits model on [0, 1] images."""
    import keras

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.estimators.classification import TensorFlowV2Classifier
    return TensorFlowV2Classifier(model, nb_classes=int(model.output_shape[-1]), input_shape=input_shape,
                                  loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                  clip_values=(0.0, 1.0))


def art_apgd(classifier, eps: float, steps: int, batch_size: int):
    """ART's APGD-CE, one start, as AutoAttack configures it (initial step 2 * eps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.evasion import AutoProjectedGradientDescent
    return AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
                                        nb_random_init=1, batch_size=batch_size, loss_type="cross_entropy",
                                        verbose=False)


def main() -> None:
    from medrobust.cli import ArgumentParser  # names the closest option on a typo

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images per attack call")
    parser.add_argument("--size", type=int, default=28, help="image side (pixels)")
    parser.add_argument("--width", type=int, default=None, help="small CNN width (default: the model's default)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timed rounds (median reported; 5: per-round ratios against ART spread "
                             "by up to a third on a shared machine, and the median of 5 ignores two bad rounds)")
    parser.add_argument("--eps", type=float, default=4 / 255)
    parser.add_argument("--jit", action="store_true", help="also time our attacks with jit_compile=True (XLA)")
    parser.add_argument("--skip-art", action="store_true", help="only our attacks and the eager loop")
    parser.add_argument("--bf16", action="store_true", help="also time our attacks on a bfloat16 twin of the model")
    parser.add_argument("--model", default=None,
                        help="a trained classifier (.keras) instead of the random-weight small CNN "
                             "(--size is then its input)")
    parser.add_argument("--op-profile", action="store_true",
                        help="also print where one input-gradient evaluation spends its time, op by op")
    parser.add_argument("--compare-inference", action="store_true",
                        help="also time our attacks on the frozen-only graph and on the plain model call")
    parser.add_argument("--inter-op", type=int, default=0, help="TensorFlow inter-op threads (0: default)")
    parser.add_argument("--intra-op", type=int, default=0, help="TensorFlow intra-op threads (0: default)")
    args = parser.parse_args()
    for name in ("batch", "size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.eps <= 1:
        parser.error(f"--eps must be in (0, 1] ([0, 1] pixel scale), got {args.eps:g}")
    if args.model and not (os.path.isfile(args.model) and args.model.endswith(".keras")):
        hint = (f"; the classifier of a run is {os.path.join(args.model, 'classifier.keras')}"
                if os.path.isfile(os.path.join(args.model, "classifier.keras")) else "")
        parser.error(f"--model {args.model}: not a .keras classifier file{hint}")
    from medrobust.cli import import_tensorflow

    for line in cpu_report():  # before any timing: which kernels these figures are of
        print(line, flush=True)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    import_tensorflow()  # without TensorFlow's CPU start-up noise (cuInit)

    import keras
    import tensorflow as tf

    if args.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    if args.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)

    from medrobust.attacks import APGD, PGD, predict_labels
    from medrobust.attacks.inference import ModelInference
    from medrobust.data.phantom import make_phantom
    from medrobust.models import build_classifier

    keras.utils.set_random_seed(0)
    if args.model:
        from medrobust.models import load_classifier

        try:
            model = load_classifier(args.model)
        except Exception as error:  # Keras' load errors are not one type
            parser.error(f"--model {args.model}: cannot be loaded as a Keras model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})")
        args.size = int(model.input_shape[1])
    else:
        model = build_classifier("small_cnn", args.size, width=args.width)
    x, _ = make_phantom(args.batch, args.size, seed=0)
    y = predict_labels(model, x)
    eps, n = args.eps, args.batch
    xt, yt = tf.constant(x), tf.constant(y, tf.int32)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def eager_loop():
        x_adv = xt
        for _ in range(10):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = loss_object(yt, model(x_adv, training=False))
            x_adv = x_adv + 0.0 * tape.gradient(loss, x_adv)  # use the gradient, nothing else
        return x_adv.numpy()

    ours_pgd = PGD(model, steps=10, early_stop=False)
    ours_apgd = APGD(model, steps=100, loss="ce", early_stop=False)
    fns = {"ours PGD-10": lambda: ours_pgd.run(x, y, eps),
           "eager 10 gradients": eager_loop,
           "ours APGD-100": lambda: ours_apgd.run(x, y, eps)}
    # gradient evaluations per image of each: PGD-10 and ART PGD take 10 (+ a final forward check),
    # APGD-100 101 (its start point and 100 steps)
    grads = {"ours PGD-10": 10, "eager 10 gradients": 10, "ours APGD-100": 101, "ART PGD-10": 10, "ART APGD-100": 101}
    if args.jit:
        jit_pgd = PGD(model, steps=10, early_stop=False, jit_compile=True)
        jit_apgd = APGD(model, steps=100, loss="ce", early_stop=False, jit_compile=True)
        fns["ours PGD-10 (XLA)"] = lambda: jit_pgd.run(x, y, eps)
        fns["ours APGD-100 (XLA)"] = lambda: jit_apgd.run(x, y, eps)
        grads.update({"ours PGD-10 (XLA)": 10, "ours APGD-100 (XLA)": 101})
    if args.bf16:
        twin = bfloat16_twin(model)
        bf_pgd = PGD(twin, steps=10, early_stop=False)
        bf_apgd = APGD(twin, steps=100, loss="ce", early_stop=False)
        adv: dict = {}
        fns["ours PGD-10 (bf16)"] = lambda: adv.__setitem__("PGD-10 (bf16)", bf_pgd.run(x, y, eps)[0])
        fns["ours APGD-100 (bf16)"] = lambda: adv.__setitem__("APGD-100 (bf16)", bf_apgd.run(x, y, eps)[0])
        grads.update({"ours PGD-10 (bf16)": 10, "ours APGD-100 (bf16)": 101})
    if args.compare_inference:
        for form in ("frozen", "model"):
            pgd_form = PGD(model, steps=10, early_stop=False)
            apgd_form = APGD(model, steps=100, loss="ce", early_stop=False)
            pgd_form.inference, apgd_form.inference = ModelInference(model, form), ModelInference(model, form)
            fns[f"ours PGD-10 ({form})"] = lambda a=pgd_form: a.run(x, y, eps)
            fns[f"ours APGD-100 ({form})"] = lambda a=apgd_form: a.run(x, y, eps)
            grads.update({f"ours PGD-10 ({form})": 10, f"ours APGD-100 ({form})": 101})
    if not args.skip_art:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import art
            from art.attacks.evasion import ProjectedGradientDescent
        classifier = art_classifier(model, x.shape[1:])
        art_pgd = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=0.25 * eps, max_iter=10,
                                           num_random_init=1, batch_size=n, verbose=False)
        art_apgd100 = art_apgd(classifier, eps, 100, n)
        fns["ART PGD-10"] = lambda: art_pgd.generate(x, y)
        fns["ART APGD-100"] = lambda: art_apgd100.generate(x, y)
    rounds = interleaved_rounds(fns, args.repeats)
    results = medians(rounds)
    macs = gradient_macs(model, x.shape[1:])
    peak = matmul_peak()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}"
          + ("" if args.skip_art else f", ART {art.__version__}")
          + f"; {os.cpu_count()} CPUs, {tf.config.threading.get_intra_op_parallelism_threads() or 'default'} "
            f"intra-op / {tf.config.threading.get_inter_op_parallelism_threads() or 'default'} inter-op threads, "
            f"load average {load_start[0]:.1f} at the start, {load:.1f} at the end (1 min; 2 of it may be "
            "this benchmark)")
    width = f"width {model.get_layer('features').units // 4}, " if not args.model else f"from {args.model}, "
    print(f"model {model.name} {args.size}x{args.size} {width}"
          f"{model.count_params():,} parameters, {macs / 1e6:.1f} MMAC per input-gradient evaluation; batch {n}; "
          f"eps {eps:.4f}; median of {args.repeats} interleaved rounds after one warm-up call "
          "(tracing and freezing excluded)")
    print(f"machine peak: float32 2048x2048 matmul {peak:.1f} GMAC/s on the same threads")
    print(f"our attacks differentiate the model's {ours_pgd._logits.kind} inference graph "
          "(medrobust.attacks.inference); GMAC/s counts the model's multiply-accumulates")
    note = "   (peak: float32; bf16 rows can exceed it)" if args.bf16 else ""
    print(f"{'attack':<24}{'seconds':>10}{'CPU s':>8}{'images/s':>10}{'GMAC/s':>9}{'of peak':>9}{note}")
    for name, (wall, cpu) in results.items():
        gmacs = n * grads[name] * macs / wall / 1e9
        print(f"{name:<24}{wall:>10.3f}{cpu:>8.2f}{n / wall:>10.1f}{gmacs:>9.1f}{gmacs / peak:>9.0%}")
    print("ratios (throughput, wall time; > 1 means ours is faster; [range of the per-round ratios]):")
    ratio = lambda a, b: results[b][0] / results[a][0]  # noqa: E731

    def spread(a, b):
        per_round = [tb[0] / ta[0] for ta, tb in zip(rounds[a], rounds[b])]
        return f"[{min(per_round):.2f}-{max(per_round):.2f}]"

    print(f"  PGD-10  ours / eager 10-gradient loop: {ratio('ours PGD-10', 'eager 10 gradients'):.2f}x "
          f"{spread('ours PGD-10', 'eager 10 gradients')}")
    if not args.skip_art:
        print(f"  PGD-10  ours / ART:                    {ratio('ours PGD-10', 'ART PGD-10'):.2f}x "
              f"{spread('ours PGD-10', 'ART PGD-10')}  (goal >= 3x)")
        print(f"  APGD-100 ours / ART:                   {ratio('ours APGD-100', 'ART APGD-100'):.2f}x "
              f"{spread('ours APGD-100', 'ART APGD-100')}  (goal >= 4x)")
    if args.bf16:
        print(f"  PGD-10  ours bf16 / ours:              {ratio('ours PGD-10 (bf16)', 'ours PGD-10'):.2f}x")
        print(f"  APGD-100 ours bf16 / ours:             {ratio('ours APGD-100 (bf16)', 'ours APGD-100'):.2f}x")
        for name, attack in (("PGD-10", ours_pgd), ("APGD-100", ours_apgd)):
            keras.utils.set_random_seed(1)
            fp32 = np.mean(predict_labels(model, attack.run(x, y, eps)[0]) == y)
            bf16 = np.mean(predict_labels(model, adv[f"{name} (bf16)"]) == y)
            print(f"  {name} robust accuracy on the float32 model: float32 attack {fp32:.3f}, bf16 attack {bf16:.3f}")
    if args.compare_inference:
        for form in ("frozen", "model"):
            print(f"  PGD-10  ours / ours on the {form} form:{' ' * (8 - len(form))}"
                  f"{ratio('ours PGD-10', f'ours PGD-10 ({form})'):.2f}x")
            print(f"  APGD-100 ours / ours on the {form} form:{' ' * (7 - len(form))}"
                  f"{ratio('ours APGD-100', f'ours APGD-100 ({form})'):.2f}x")
    if args.op_profile:
        op_profile(model, x, y, macs, peak)
    if args.jit:
        print(f"  PGD-10  ours XLA / ours:               {ratio('ours PGD-10 (XLA)', 'ours PGD-10'):.2f}x")
        print(f"  APGD-100 ours XLA / ours:              {ratio('ours APGD-100 (XLA)', 'ours APGD-100'):.2f}x")


if __name__ == "__main__":
    main()
