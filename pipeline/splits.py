"""Which split each indexed file goes to (docs/data.md, "Splits by track").

A folder named test/val/valid/validation decides for the files under it; every other group
goes by a stable hash draw, so adding files never moves an existing group. A small tree can
draw no group at all for val (or test): then one train group is forced there, and the choice is
recorded so that later runs keep it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.audio import split_stream_key
from pipeline.errors import PipelineError

STEM_FILE = ".stem.mp4"  # a multi-stream song file (MUSDB18, NI Stems)
SPLIT_FOLDERS = {"test": "test", "val": "val", "valid": "val", "validation": "val"}


def draw(seed: int, group: str) -> float:
    """A stable uniform number in [0, 1) for a group: adding groups never moves another."""
    digest = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def group_of(rel: str, group_by: str) -> str:
    """The group (track) of an index key: its folder, the file, or a pattern's match. The stems
    of a `.stem.mp4` (`FILE#STEM` keys) are one song, the file; under `parent` too, since
    MUSDB18's stem files lie flat in `train/` and `test/`, one song each."""
    rel = split_stream_key(rel)[0]
    if group_by == "parent":
        return rel if rel.lower().endswith(STEM_FILE) else os.path.dirname(rel)
    if group_by == "file":
        return rel
    if group_by.startswith("regex:"):
        match = re.search(group_by[6:], rel)
        return (match.group(1) if match and match.groups() else match.group(0)) if match else rel
    raise PipelineError(f"--group-by {group_by!r}: expected parent, file or regex:PATTERN")


def folder_split(rel: str) -> str | None:
    """The split a folder on the path names, or None when the hash draw decides."""
    for part in rel.lower().split("/")[:-1]:
        if part in SPLIT_FOLDERS:
            return SPLIT_FOLDERS[part]
    return None


def default_test(rels: Iterable[str]) -> float:
    """A tree with a test folder has its test split already; others hash 10% of groups there."""
    return 0.0 if any("test" in rel.lower().split("/")[:-1] for rel in rels) else 0.1


@dataclass
class Splits:
    """The outcome, and what of it the manifest must record for later runs to keep."""

    of: dict[str, tuple[str, str]]  # file -> (split, group)
    forced: dict[str, str]  # group -> split, for every group its draw did not place


def decide_splits(
    chunks: dict[str, int],
    group_by: str,
    seed: int,
    val: float,
    test: float,
    kept: dict[str, str],
) -> Splits:
    """Each file's split, from its whole chunks (`chunks`) and the forced splits of an earlier set.

    A hash-split group listed in `kept` keeps that split. Then, for val and then test, a share
    above 0 that no group holding a chunk reached takes the train group with the smallest draw
    (the nearest to the bands below train), as long as train keeps another group. Val goes
    first: with two groups `fit` needs val, while test only serves the final evaluation. A forced
    choice is a note on stderr.
    """
    groups = {rel: group_of(rel, group_by) for rel in chunks}
    by_folder = {rel: folder_split(rel) for rel in chunks}
    hashed: dict[str, int] = {}  # group -> chunks of its files outside split folders
    for rel, group in groups.items():
        if by_folder[rel] is None:
            hashed[group] = hashed.get(group, 0) + chunks[rel]
    draws = {group: draw(seed, group) for group in hashed}
    forced = {group: kept[group] for group in hashed if group in kept}
    split = {
        group: forced.get(group) or ("test" if u < test else "val" if u < test + val else "train")
        for group, u in draws.items()
    }
    by_folder_held = {s for rel, s in by_folder.items() if s is not None and chunks[rel]}
    for name, share in (("val", val), ("test", test)):
        held = by_folder_held | {split[group] for group, n in hashed.items() if n}
        train = sorted(
            (group for group, n in hashed.items() if n and split[group] == "train"),
            key=lambda group: (draws[group], group),
        )
        if share > 0 and name not in held and len(train) > 1:
            split[train[0]] = forced[train[0]] = name
            print(
                f"note: the {name} split drew no group; {train[0] or '.'} goes to {name} "
                "(recorded in the manifest)",
                file=sys.stderr,
            )
    of = {rel: (by_folder[rel] or split[group], group) for rel, group in groups.items()}
    return Splits(of, forced)
