"""How many inner PGD steps does adversarial training need at its budget? The loss PGD-K reaches on a trained run.

    python benchmarks/pgd_inner_steps.py RUN [--steps 1,3,5,7,10,20] [--images 512] [--repeats 3] [--json OUT.json]

PGD-AT (Madry et al. 2018) trains on the last iterate of K signed-gradient steps of size 2.5 eps / K from a
uniform start (medrobust.training.supervised.pgd_linf, the trainers' own attack) at the run's training budget
(--train-eps, [0, 1] pixel scale). If K steps already reach (nearly) the cross-entropy that many more steps
reach, a K-step inner loop gives the same training signal for less: each inner step costs about half a
training step (benchmarks/ssat_step.py), so the inner loop is most of PGD-AT's and TRADES' training time.
For each K it prints the mean adversarial cross-entropy over `--repeats` random starts, its share of the
largest K's, and the error rate, on `--images` scans of the run's training split (labels as given; no val
or test scan is read). Figures from the synthetic phantom are marked SYNTHETIC.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrobust import cli  # noqa: E402  (after the path insert, so a checkout runs without installing)
from medrobust.io import read_run_config  # noqa: E402
from medrobust.train import TRAIN_EPS  # noqa: E402  (no TensorFlow import)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished medrobust run folder (config.json, classifier.keras)")
    parser.add_argument("--steps", default="1,3,5,7,10,20", help="inner step counts K to compare")
    parser.add_argument("--images", type=int, default=512, help="training scans attacked (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="random starts per K (default 3)")
    parser.add_argument("--eps", type=float, default=None,
                        help="budget in [0, 1] pixel scale (default: the run's train_eps, else the train CLI's)")
    parser.add_argument("--json", default=None, help="also write the results to this new .json file")
    args = parser.parse_args(argv)
    try:
        steps = sorted({cli.parse_int(s, "steps") for s in args.steps.split(",")})
    except cli.UsageError:
        raise cli.UsageError(f"--steps must be integers, got {args.steps!r}") from None
    if steps[0] < 1 or args.images < 1 or args.repeats < 1:
        raise cli.UsageError("--steps, --images and --repeats must be >= 1")
    if args.eps is not None and not 0 < args.eps <= 1:
        raise cli.UsageError(f"--eps must be in (0, 1], got {args.eps}")
    run = Path(args.run)
    try:
        config = read_run_config(run)
    except ValueError as exc:
        raise cli.UsageError(f"{run}: not a finished medrobust run ({exc})") from None
    if not (run / "classifier.keras").is_file():
        raise cli.UsageError(f"{run}: not a finished medrobust run (no classifier.keras)")
    cli.check_new_json(args.json)
    eps = args.eps if args.eps is not None else float(config.get("train_eps") or TRAIN_EPS)

    cli.import_tensorflow()
    import tensorflow as tf

    from medrobust.data import load_data
    from medrobust.models import load_classifier
    from medrobust.training.base import ce  # the trainers' own loss
    from medrobust.training.supervised import pgd_linf

    data = load_data(config.get("data_resolved") or config["data"], image_size=int(config["image_size"]),
                     seed=int(config.get("seed", 0)))
    x, y = data["train"]
    pick = np.random.default_rng(0).choice(len(y), min(args.images, len(y)), replace=False)
    x, y = tf.constant(x[pick]), tf.constant(np.asarray(y)[pick].astype(np.int32))
    model = load_classifier(run / "classifier.keras")

    rows = []
    for k in steps:
        losses, errors = [], []
        for repeat in range(args.repeats):
            tf.random.set_seed(repeat)
            logits = model(pgd_linf(model, x, y, eps, k, ce), training=False)
            losses.append(float(tf.reduce_mean(ce(logits, y))))
            errors.append(float(tf.reduce_mean(tf.cast(tf.argmax(logits, -1, output_type=tf.int32) != y,
                                                       tf.float32))))
        rows.append({"steps": k, "cross_entropy": float(np.mean(losses)), "cross_entropy_sd": float(np.std(losses)),
                     "error": float(np.mean(errors))})
    top = rows[-1]["cross_entropy"]
    tag = "SYNTHETIC " if data.synthetic else ""
    print(f"{tag}run {run} ({config.get('method')}), eps {eps:g}, {len(pick)} training scans of {data.source}, "
          f"{args.repeats} random starts")
    print("| inner steps K | adversarial cross-entropy | share of PGD-%d's | error |" % steps[-1])
    print("|---:|---:|---:|---:|")
    for row in rows:
        row["share_of_most_steps"] = row["cross_entropy"] / top if top else None
        share = f"{row['share_of_most_steps']:.4f}" if top else "-"
        print(f"| {row['steps']} | {row['cross_entropy']:.4f} ± {row['cross_entropy_sd']:.4f} | {share} | "
              f"{row['error']:.4f} |")
    cli.write_json_results(args.json, [{"run": str(run), "eps": eps, "images": len(pick), "repeats": args.repeats,
                                        "data_source": data.source, "synthetic_data": data.synthetic,
                                        "steps": rows}], "benchmarks/pgd_inner_steps.py", argv)


if __name__ == "__main__":
    cli.run_script(main)
