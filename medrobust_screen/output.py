"""Where result rows go: CSV on standard output, or a .csv / .json file written beside its final name
and renamed into place at the end."""

from __future__ import annotations

import csv
import json
import os
import sys

from medrobust_screen.errors import UsageError
from medrobust_screen.screener import COLUMNS, VERDICT_ERROR
from medrobust_screen.tempfiles import mkstemp_beside

# Columns that describe the run rather than the image: in the JSON output they live in the header.
RUN_COLUMNS = ("training_data", "bundle_signature")


def output_format(out: str | None) -> str:
    """'csv' or 'json' for --out (CSV on stdout without it); UsageError for another extension or a
    folder that does not exist."""
    if not out:
        return "csv"
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".csv", ".json"):
        raise UsageError(f"--out must end with .csv or .json, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out: folder {folder} does not exist")
    if os.path.isdir(out):
        raise UsageError(f"--out: {out} is a folder")
    return ext[1:]


class Sink:
    """Rows to stdout (CSV) or to --out (CSV or JSON), written to a temp file and renamed at the end.
    Nothing is written (no file created, no CSV header printed) before the first row."""

    def __init__(self, out: str | None, header: dict, columns: tuple[str, ...] = COLUMNS):
        self.out, self.header, self.columns, self.count = out, header, columns, 0
        self.format = output_format(out)
        self.file = self.tmp = self.writer = None

    def _open(self) -> None:
        if self.out:
            fd, self.tmp = mkstemp_beside(self.out)  # the umask's mode, not mkstemp's 0600
            self.file = os.fdopen(fd, "w", encoding="utf-8", newline="")
        else:
            self.file = sys.stdout
        if self.format == "csv":
            self.writer = csv.DictWriter(self.file, fieldnames=self.columns, lineterminator="\n")
            self.writer.writeheader()
        else:
            self.file.write("{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n"
                                            for k, v in self.header.items()) + '  "results": [')

    def write(self, row: dict) -> None:
        if self.file is None:
            self._open()
        if self.format == "csv":
            self.writer.writerow(row)
        else:
            self.file.write(("," if self.count else "") + "\n    " + json.dumps(_json_row(row)))
        self.count += 1

    def close(self, summary: dict) -> None:
        if self.file is None:
            return
        if self.format == "json":
            self.file.write(("\n  " if self.count else "") + "],\n  \"summary\": " + json.dumps(summary) + "\n}\n")
        self.file.flush()
        if self.tmp:
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if self.tmp:
            self.file.close()
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def _json_row(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in RUN_COLUMNS}  # in the JSON header instead
    for k in ("confidence", "anomaly_score", "p_disease", "disease_screen"):
        if out.get(k) == "":
            out[k] = None
    if not out["error"]:
        out["error"] = None
    if out["verdict"] == VERDICT_ERROR or out["class"] == "":
        out["class"] = None
    return out
