"""Training, validation and test sets: files given as they are, or one file split at random,
structure by structure or group by group (`split_by`), so that correlated frames of one MD
trajectory never land on both sides of the split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from ase import Atoms

from .data import DbRows, open_structures
from .config import DataConfig, TrainConfig


def split_indices(n: int, sizes: Sequence[int | float | None], seed: int) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes from one seeded permutation of range(n).

    A size is a count, a fraction of n (a float below 1), or None for all that remain.
    The same (n, sizes, seed) always gives the same split.
    """
    counts = []
    for size in sizes:
        if size is None:
            counts.append(None)
        elif isinstance(size, float) and 0 < size < 1:
            counts.append(int(round(size * n)))
        else:
            counts.append(int(size))
    fixed = sum(c for c in counts if c is not None)
    rest = n - fixed
    if fixed > n or any(c is not None and c < 0 for c in counts):
        raise ValueError(f"split sizes {list(sizes)} need {fixed} structures, the data has {n}")
    counts = [rest if c is None else c for c in counts]
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for c in counts:
        out.append(np.sort(perm[start : start + c]))
        start += c
    return out


def group_split(groups: Sequence, sizes: Sequence[int | float | None], seed: int) -> list[np.ndarray]:
    """Structure indices split so that all structures with the same group id share a set.
    The sizes count groups (as split_indices counts structures)."""
    ids, member_of = np.unique(np.asarray(groups), return_inverse=True)
    try:
        parts = split_indices(len(ids), sizes, seed)
    except ValueError:
        raise ValueError(f"split sizes {list(sizes)} count groups with split_by, and the data has {len(ids)} "
                         "groups; give smaller data.n_train/n_val/n_test") from None
    return [np.flatnonzero(np.isin(member_of, part)) for part in parts]


def group_ids(structures: Sequence[Atoms], key: str, source: str) -> np.ndarray:
    """The group id of every structure: its info[key] (an npz array of shape (S,), an extxyz/db info key)."""
    if isinstance(structures, DbRows):  # streamed from the database's key-value pairs
        ids = structures.info_column(key)
        if None in ids:
            i = ids.index(None)
            raise ValueError(f"data.split_by is '{key}' but row {int(structures.ids[i])} of {source} has no '{key}'; "
                             f"add the key-value pair '{key}' to every row")
    else:
        for i, atoms in enumerate(structures):
            if key not in atoms.info:
                known = ", ".join(sorted(atoms.info)) or "none"
                raise ValueError(f"data.split_by is '{key}' but structure {i} of {source} has no '{key}' (its keys: "
                                 f"{known}); add a per-structure '{key}' array (npz) or info key (extxyz)")
        ids = [atoms.info[key] for atoms in structures]
    if not all(isinstance(v, (int, str, np.integer, np.str_)) for v in ids):
        raise ValueError(f"data.split_by '{key}' must hold one whole number or string per structure, "
                         f"got {type(ids[0]).__name__}; store a trajectory or system id")
    return np.asarray(ids)


@dataclass
class Splits:
    train: list[Atoms]
    validation: list[Atoms]
    test: list[Atoms]
    # for each set drawn from data.path: its indices there (None for a set read from its own file)
    indices: dict


def plan_splits(data: DataConfig | dict) -> dict[str, tuple[Sequence[Atoms], np.ndarray]]:
    """For each set (train, validation, test): (the structures it is drawn from, its indices
    there). The structures are a list in memory, or DbRows (an ASE database read on demand), so
    that a data set larger than memory is split without being loaded. A dict is a data section
    saved in a checkpoint."""
    dc = TrainConfig.from_dict({"data": data}).data if isinstance(data, dict) else data
    if not dc.path:
        raise ValueError("data.path is not set: give the training data file (data.path in the config, or --data)")
    structures = open_structures(dc.path)
    n = len(structures)
    groups = group_ids(structures, dc.split_by, dc.path) if dc.split_by else None

    def split(sizes):
        return split_indices(n, sizes, dc.split_seed) if groups is None else group_split(groups, sizes, dc.split_seed)

    if dc.validation is not None:
        indices = {"train": np.arange(n), "validation": None, "test": None}
    elif dc.test is not None:
        val, train = split([dc.n_val, None])
        indices = {"train": train, "validation": val, "test": None}
    else:
        train, val, test = split([dc.n_train, dc.n_val, dc.n_test])
        indices = {"train": train, "validation": val, "test": test}
    plan = {}
    for name, file in (("train", None), ("validation", dc.validation), ("test", dc.test)):
        if indices[name] is not None:
            plan[name] = (structures, indices[name])
        elif file is not None:
            other = open_structures(file)
            plan[name] = (other, np.arange(len(other)))
        else:
            plan[name] = ([], np.zeros(0, dtype=np.int64))
    sizes = {name: len(idx) for name, (_, idx) in plan.items()}
    if not sizes["train"] or not sizes["validation"]:
        raise ValueError(f"the split leaves {sizes['train']} training and {sizes['validation']} validation "
                         "structures; change data.n_train/n_val (or give data.validation)")
    plan["indices"] = indices
    return plan


def load_splits(data: DataConfig | dict) -> Splits:
    """The three sets a data config describes, in memory (a dict is a data section saved in a
    checkpoint)."""
    plan = plan_splits(data)
    chosen = [[source[int(i)] for i in idx] for source, idx in (plan[name] for name in ("train", "validation", "test"))]
    return Splits(*chosen, plan["indices"])
