"""Resumable evaluation: every finished (attack, eps) is written to OUT/progress/ as it finishes.

OUT/progress/state.json holds the evaluation's fingerprint (a hash of the images, labels, model files and
every option that changes a figure), each finished entry and its ROC points; OUT/progress/ATTACK.npz the
arrays the attack's next budget starts from (its adversaries so far, or a minimum-norm result). A rerun of
the same command skips what is finished and continues from there; once the report is complete the .npz
files are deleted (state.json stays: rerunning a finished evaluation rewrites the report in seconds).

An output folder holding an evaluation with another fingerprint (other data, model or options) is
cleared of every file an evaluation writes (report.json, report.md, the plots, progress/) before the new
one starts, so no figure or plot of the old one survives next to the new one; other files are left alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from medrobust.io import atomic_write_bytes, atomic_write_json, read_json

FORMAT = "medrobust-eval-progress/1"
REPORT_FILES = ("report.json", "report.md")


def fingerprint(x: np.ndarray, y: np.ndarray, model_files: list[Path], options: dict) -> str:
    """sha256 over the images, labels, model files and options (JSON, sorted keys)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.ascontiguousarray(y, np.int64).tobytes())
    for path in sorted(model_files):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Progress:
    def __init__(self, out_dir: Path, print_fn=print):
        self.out = Path(out_dir)
        self.dir = self.out / "progress"
        self.state_file = self.dir / "state.json"
        self.state: dict = {}
        self.print = print_fn

    def open(self, fp: str, owned_files: tuple[str, ...]) -> int:
        """Load the finished entries of an evaluation with fingerprint fp in this folder, or clear what
        an evaluation with another fingerprint left there. Returns the number of finished entries."""
        old = None
        if self.state_file.is_file():
            try:
                old = read_json(self.state_file)
            except ValueError:
                old = None
        if old is not None and old.get("format") == FORMAT and old.get("fingerprint") == fp:
            self.state = old
            return sum(len(v) for v in old.get("entries", {}).values())
        stale = [name for name in REPORT_FILES + owned_files if (self.out / name).exists()]
        if stale or self.dir.exists():
            self.print(f"note: {self.out} holds an evaluation of other data, model or options; "
                       f"replacing it (removing {', '.join(stale + (['progress/'] if self.dir.exists() else []))})")
            for name in stale:
                (self.out / name).unlink()
            shutil.rmtree(self.dir, ignore_errors=True)
        self.state = {"format": FORMAT, "fingerprint": fp, "entries": {}, "curves": {}, "seconds": {}}
        atomic_write_json(self.state_file, self.state)
        return 0

    def entries(self, attack: str) -> dict:
        return self.state["entries"].get(attack, {})

    def curves(self) -> dict:
        """{(attack, eps_key, adaptive): (fpr, tpr)} of every finished entry."""
        out = {}
        for key, (fpr, tpr) in self.state["curves"].items():
            attack, eps, adaptive = key.split("|")
            out[attack, eps, adaptive == "adaptive"] = (np.asarray(fpr), np.asarray(tpr))
        return out

    def seconds(self, part: str) -> float | None:
        return self.state["seconds"].get(part)

    def set_seconds(self, part: str, seconds: float) -> None:
        self.state["seconds"][part] = seconds
        atomic_write_json(self.state_file, self.state)

    def carry(self, attack: str) -> dict | None:
        path = self.dir / f"{attack}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
        carry = {k: v for k, v in flat.items() if not k.startswith("adaptive.")}
        if "eps" in carry:
            carry["eps"] = float(carry["eps"])
        adaptive = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("adaptive.")}
        if adaptive:
            carry["adaptive"] = adaptive
        return carry

    def save(self, attack: str, eps_key: str, entry: dict, curves: dict, carry: dict | None) -> None:
        """Arrays first, then the entry: an interruption between the two only costs recomputing it."""
        if carry is not None:
            flat = {k: v for k, v in carry.items() if k != "adaptive"}
            flat.update({f"adaptive.{k}": v for k, v in (carry.get("adaptive") or {}).items()})
            buffer = io.BytesIO()
            np.savez(buffer, **flat)
            atomic_write_bytes(self.dir / f"{attack}.npz", buffer.getvalue())
        self.state["entries"].setdefault(attack, {})[eps_key] = entry
        for (name, eps, adaptive), (fpr, tpr) in curves.items():
            self.state["curves"][f"{name}|{eps}|{'adaptive' if adaptive else 'plain'}"] = [
                np.round(fpr, 6).tolist(), np.round(tpr, 6).tolist()]
        atomic_write_json(self.state_file, self.state)

    def min_norms(self) -> dict:
        return self.state.get("min_norm", {})

    def save_min_norm(self, attack: str, info: dict) -> None:
        self.state.setdefault("min_norm", {})[attack] = info
        atomic_write_json(self.state_file, self.state)

    def finish(self) -> None:
        for path in self.dir.glob("*.npz"):
            path.unlink()
