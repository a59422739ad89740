"""Patient-level splits only: a patient's slices are never on both sides of a split.

A :class:`Split` names case ids (patients), never slices. Modes: ``all`` (train on every case),
``holdout`` (validation/test cases named or drawn with a seed), leave-one-patient-out and k-fold
cross-validation (:func:`cross_validation`), where every patient is held out exactly once.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..errors import CTMRIError


@dataclass
class Split:
    mode: str
    train_cases: list = field(default_factory=list)
    val_cases: list = field(default_factory=list)
    test_cases: list = field(default_factory=list)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "Split":
        """Refuse a split that shares a patient between its parts, or trains on nobody."""
        parts = {"train": set(self.train_cases), "val": set(self.val_cases), "test": set(self.test_cases)}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = parts[a] & parts[b]
            if shared:
                raise CTMRIError(f"split {self.mode!r}: patient(s) {sorted(shared)} are in both {a} and {b}")
        if not self.train_cases:
            raise CTMRIError(f"split {self.mode!r} leaves no training patients")
        return self


def all_cases(case_ids: list[str], seed: int = 0) -> Split:
    return Split("all", list(case_ids), [], [], seed).check()


def holdout(case_ids: list[str], val_cases=(), test_cases=(), n_val: int = 0, seed: int = 0) -> Split:
    """Named validation/test patients, or ``n_val`` validation patients drawn with ``seed``."""
    ids = list(case_ids)
    unknown = sorted((set(val_cases) | set(test_cases)) - set(ids))
    if unknown:
        raise CTMRIError(f"unknown case id(s) {unknown}; known: {ids}")
    val, test = list(val_cases), list(test_cases)
    if not val and n_val:
        rest = [c for c in ids if c not in test]
        val = sorted(random.Random(seed).sample(rest, n_val))
    train = [c for c in ids if c not in val and c not in test]
    return Split("holdout", train, val, test, seed).check()


def cross_validation(case_ids: list[str], folds: int = 0, seed: int = 0) -> list[Split]:
    """Leave-one-patient-out (``folds`` 0 or = number of patients) or k-fold over patients.

    Each fold's held-out patients are its ``test_cases``; they are also its ``val_cases`` for the epoch
    log only (the trainer's cross-validation keeps the last epoch, so they never select a model).
    """
    ids = list(case_ids)
    n = len(ids)
    if n < 2:
        raise CTMRIError("cross-validation needs at least 2 patients")
    k = n if folds in (0, n) else folds
    if not 2 <= k <= n:
        raise CTMRIError(f"--folds must be between 2 and the number of patients ({n}), not {folds}")
    order = list(ids)
    if k != n:
        random.Random(seed).shuffle(order)
    groups = [order[i::k] for i in range(k)]
    splits = []
    for i, held in enumerate(groups):
        held = sorted(held, key=ids.index)
        train = [c for c in ids if c not in held]
        mode = "leave-one-patient-out" if k == n else "k-fold"
        split = Split(f"{mode}: fold {i + 1} of {k}", train, [], list(held), seed).check()
        splits.append(split)
    return splits


def drop_random(train_ids: list[str], n: int, seed: str) -> tuple[list[str], list[str]]:
    """``train_ids`` less ``n`` drawn with ``seed`` (kept in their order), and the dropped ones (bagging)."""
    if n < 0 or n >= len(train_ids):
        raise CTMRIError(f"--drop-patients {n}: choose 0..{len(train_ids) - 1} (of {len(train_ids)} training patients)")
    dropped = sorted(random.Random(seed).sample(list(train_ids), n), key=list(train_ids).index)
    return [c for c in train_ids if c not in dropped], dropped


def check_known(requested: list[str], case_ids: list[str], option: str) -> list[str]:
    """``requested`` if every id is a patient of the data; else a message naming the known ones."""
    unknown = sorted(set(requested) - set(case_ids))
    if unknown:
        raise CTMRIError(f"{option}: unknown patient id(s) {unknown}; the data has {list(case_ids)}")
    return list(requested)


def exclude(train_ids: list[str], excluded: list[str], split_record: dict) -> tuple[list[str], dict]:
    """The training patients less ``excluded``, and the split record that says so.

    Used for patients whose target is not what the model should learn (another MRI sequence): in a
    cross-validation they are still held out and scored, they only never teach a fold.
    """
    kept = [c for c in train_ids if c not in set(excluded)]
    if not kept:
        raise CTMRIError(f"excluding {list(excluded)} from training leaves no training patients in "
                         f"{split_record.get('mode', 'this split')}; exclude fewer")
    removed = [c for c in train_ids if c in set(excluded)]
    return kept, {**split_record, "train_cases": kept, "excluded_from_training": removed}
