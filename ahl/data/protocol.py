"""The open-set protocol: which anomalies are seen in training, which are tested, and contamination.

General setting: all anomaly files sorted, shuffled with the seed; the first M are the seen (training)
anomalies. The test set excludes the first ``max(M, test_set_m)`` files, so M = 1 is tested on the same test
set as M = 10, as the DRA paper does. Hard setting: the M training anomalies come from ``known_class`` alone and
the test set holds the normals and every *other* class.

Validation: a fraction of the training normals is held out of training (neither the base model nor AHL sees it)
to choose a deployment threshold; with them, the anomalies that are neither seen nor tested (files M .. max(M,
test_set_m) of the shuffled pool; in the hard setting the known class's files after the first M), which the F1
rule needs. No file is in two of train, validation and test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ahl.core.errors import UserError
from ahl.data.mvtec import GOOD, Subset


@dataclass(frozen=True)
class ProtocolConfig:
    n_anomalies: int = 10  # M, the labelled anomalies seen in training
    test_set_m: int = 10  # the test set is the one of M = test_set_m (general setting)
    known_class: str | None = None  # None: general setting; a class name: hard setting
    contamination: float = 0.0  # fraction of unlabelled anomalies mixed into the normal training data
    validation_fraction: float = 0.0  # fraction of the training normals held out to choose the threshold

    def __post_init__(self) -> None:
        if self.n_anomalies < 1:
            raise UserError(f"params.yaml: protocol.n_anomalies must be >= 1, got {self.n_anomalies}")
        if self.test_set_m < 0:
            raise UserError(f"params.yaml: protocol.test_set_m must be >= 0, got {self.test_set_m}")
        if not 0.0 <= self.contamination < 0.5:
            raise UserError(f"params.yaml: protocol.contamination must be in [0, 0.5), got {self.contamination}")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise UserError(
                f"params.yaml: protocol.validation_fraction must be in [0, 0.5), got {self.validation_fraction}"
            )


@dataclass
class Sample:
    file: str  # relative to the subset directory
    label: int  # 0 normal, 1 anomaly (as used for training / as the ground truth for testing)
    cls: str  # "good" or the anomaly class
    seen: bool = False  # test anomalies: is its class among the seen ones?
    contaminated: bool = False  # training "normals" that are in fact unlabelled anomalies


@dataclass
class Split:
    classname: str
    setting: str  # "general" or "hard"
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    seen_classes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    validation: list[Sample] = field(default_factory=list)  # held-out normals (0) and spare anomalies (1)

    @property
    def train_normals(self) -> list[Sample]:
        return [s for s in self.train if s.label == 0]

    @property
    def train_anomalies(self) -> list[Sample]:
        return [s for s in self.train if s.label == 1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(
            classname=d["classname"],
            setting=d["setting"],
            train=[Sample(**s) for s in d["train"]],
            test=[Sample(**s) for s in d["test"]],
            seen_classes=list(d["seen_classes"]),
            config=dict(d.get("config", {})),
            validation=[Sample(**s) for s in d.get("validation", [])],
        )

    def summary(self) -> dict:
        test_anom = [s for s in self.test if s.label == 1]
        return {
            "train_normal": len(self.train_normals),
            "train_anomaly": len(self.train_anomalies),
            "contaminated": sum(s.contaminated for s in self.train),
            "test_normal": sum(s.label == 0 for s in self.test),
            "test_anomaly_seen": sum(s.seen for s in test_anom),
            "test_anomaly_unseen": sum(not s.seen for s in test_anom),
            "validation_normal": sum(s.label == 0 for s in self.validation),
            "validation_anomaly": sum(s.label == 1 for s in self.validation),
        }


def make_split(subset: Subset, config: ProtocolConfig, seed: int, classname: str = "") -> Split:
    """Choose the seen anomalies and the test set of ``subset`` (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    m = config.n_anomalies
    if config.known_class is None:
        pool = sorted(f for files in subset.anomalies.values() for f in files)
        pool = [pool[i] for i in rng.permutation(len(pool))]
        held_out = max(m, config.test_set_m)
        if len(pool) <= held_out:
            raise UserError(
                f"{classname or subset.root}: protocol.n_anomalies={m} (test set of M={config.test_set_m}) needs "
                f"more than {held_out} anomalies, but the subset has {len(pool)}; lower protocol.n_anomalies/"
                "protocol.test_set_m or choose another classname"
            )
        seen_files, spare, test_anomalies = pool[:m], pool[m:held_out], pool[held_out:]
        setting = "general"
    else:
        if config.known_class not in subset.anomalies:
            raise UserError(
                f"protocol.known_class={config.known_class!r} is not an anomaly class of {classname!r}; "
                f"its classes are: {', '.join(subset.anomaly_classes)}"
            )
        candidates = list(subset.anomalies[config.known_class])
        candidates = [candidates[i] for i in rng.permutation(len(candidates))]
        if len(candidates) < m:
            raise UserError(
                f"protocol.n_anomalies={m} but class {config.known_class!r} of {classname!r} has only "
                f"{len(candidates)} anomalies; lower protocol.n_anomalies"
            )
        seen_files, spare = candidates[:m], candidates[m:]
        others = sorted(f for c, files in subset.anomalies.items() if c != config.known_class for f in files)
        if not others:
            raise UserError(
                f"{classname!r} has only the class {config.known_class!r}: the hard setting needs other classes"
            )
        test_anomalies = [others[i] for i in rng.permutation(len(others))]
        setting = "hard"

    cls_of = {f: c for c, files in subset.anomalies.items() for f in files}
    seen_classes = sorted({cls_of[f] for f in seen_files})
    train_good, held = validation_normals(subset.train_good, config.validation_fraction, seed)
    train = [Sample(f, 0, GOOD) for f in train_good]
    n_contaminated = int(round(config.contamination * len(train_good)))
    if n_contaminated:
        if n_contaminated >= len(test_anomalies):
            raise UserError(
                f"protocol.contamination={config.contamination} needs {n_contaminated} unlabelled anomalies but "
                f"only {len(test_anomalies)} remain for testing; lower protocol.contamination"
            )
        # Contaminating anomalies leave the test set and enter training as (wrongly) normal.
        contaminating, test_anomalies = test_anomalies[:n_contaminated], test_anomalies[n_contaminated:]
        train += [Sample(f, 0, cls_of[f], contaminated=True) for f in contaminating]
    train += [Sample(f, 1, cls_of[f]) for f in seen_files]
    test = [Sample(f, 0, GOOD) for f in subset.test_good]
    test += [Sample(f, 1, cls_of[f], seen=cls_of[f] in seen_classes) for f in sorted(test_anomalies)]
    validation = [Sample(f, 0, GOOD) for f in held] + [Sample(f, 1, cls_of[f]) for f in sorted(spare)]
    return Split(classname, setting, train, test, seen_classes, {**asdict(config), "seed": seed}, validation)


def validation_normals(files: tuple[str, ...], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training normals, validation normals): round(fraction * N) files (at least one when fraction > 0) drawn
    with their own generator of ``seed``, so the anomaly draws do not depend on the fraction. Both sorted."""
    n_val = max(1, int(round(fraction * len(files)))) if fraction > 0 else 0
    if n_val >= len(files):
        raise UserError(f"protocol.validation_fraction={fraction} leaves no training normals of {len(files)}; lower it")
    held = set(np.random.default_rng([seed, 1]).choice(len(files), size=n_val, replace=False).tolist())
    return [f for i, f in enumerate(files) if i not in held], [files[i] for i in sorted(held)]
