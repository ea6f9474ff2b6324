"""`python -m pipeline ...`: a thin argparse layer, one public function per sub-command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError, run_cli

MAX_LISTED_REJECTIONS = 50


def _cmd_synth(args: argparse.Namespace) -> None:
    from pipeline.synth import make_corpus

    paths = make_corpus(args.out, args.tracks, args.seconds, args.seed, args.sample_rate)
    print(f"synth: wrote {len(paths)} tracks of {args.seconds:g} s under {args.out}")


def _cmd_index(args: argparse.Namespace) -> None:
    from pipeline.index import build_index, default_index_path, stems_sum_lines

    out = args.out or default_index_path(args.root)
    result = build_index(
        args.root, out, args.jobs, args.lengths_json, progress=not args.quiet, stems=args.stems
    )
    index = result.index
    for line in stems_sum_lines(index):
        print(line)
    rejected = sorted(index.rejected.items())
    for rel, rejection in rejected[:MAX_LISTED_REJECTIONS]:
        print(f"rejected: {rel}: {rejection.reason}", file=sys.stderr)
    if len(rejected) > MAX_LISTED_REJECTIONS:
        print(
            f"rejected: ... and {len(rejected) - MAX_LISTED_REJECTIONS} more, see {out}",
            file=sys.stderr,
        )
    print(
        f"index: {len(index.files)} accepted ({index.seconds / 3600:.2f} h of audio), "
        f"{len(rejected)} rejected; {result.opened} opened, {result.reused} unchanged -> {out}"
    )


def _cmd_shard(args: argparse.Namespace) -> None:
    from pipeline.append import append_shards
    from pipeline.shard import write_shards

    out = args.out or args.index.parent
    options = dict(
        partition=args.partition,
        jobs=args.jobs,
        progress=not args.quiet,
        chunk_frames=args.chunk_frames,
        shard_bytes=args.shard_bytes,
        seed=args.seed,
        val=args.val,
        test=args.test,
        channels=args.channels,
        sample_rate=args.sample_rate,
        silence_db=args.silence_db,
        include=args.include,
        group_by=args.group_by,
        interleave=args.interleave,
    )
    if not args.append:
        if args.prune:
            raise PipelineError("--prune: only with --append (it records files an append lost)")
        _print_shard_summary(
            write_shards(args.index, args.out, **options, splits_from=args.splits_from), out
        )
        return
    if args.splits_from is not None:
        raise PipelineError(
            "--splits-from: not with --append, which keeps the splits of the set in --out"
        )
    m = append_shards(args.index, args.out, prune=args.prune, **options)
    if m is None:
        print(f"shard --append: nothing new in {args.index}; {out} is unchanged")
        return
    added = m.generations[-1]
    print(
        f"shard --append: generation {len(m.generations) - 1} adds {len(added.files or {})} "
        f"files in {sum(len(p) for p in added.shards.values())} shards"
        + (f", records {len(added.pruned)} gone (--prune)" if added.pruned else "")
    )
    _print_shard_summary(m, out)


def _print_shard_summary(m, out: Path | str) -> None:
    for split, infos in m.shards.items():
        silent = sum(i.silent_chunks for i in infos)
        print(
            f"  {split:<5} {m.files[split]:>6} files {m.tracks[split]:>5} tracks "
            f"{m.samples(split):>8} chunks {len(infos):>4} shards {m.seconds(split) / 3600:8.3f} h"
            f"  ({silent} silent chunks skipped)"
        )
    print(
        f"shard: {m.config.chunk_frames}-frame chunks at {m.config.sample_rate} Hz, "
        f"{m.dropped_tail_frames} tail frames dropped, {len(m.rejected)} files rejected, "
        f"{len(m.duplicates)} duplicates, {len(m.resampled)} resampled -> {out}"
    )


def _cmd_merge(args: argparse.Namespace) -> None:
    from pipeline.merge import merge_manifests

    out = args.out or args.folders[0]
    _print_shard_summary(merge_manifests(args.folders, args.out), out)


def _cmd_verify(args: argparse.Namespace) -> None:
    from pipeline.verify import verify

    problems = verify(args.folder, against_source=args.against_source, progress=not args.quiet)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise PipelineError(f"{args.folder}: {len(problems)} problems found")
    print(
        f"verify: {args.folder} is intact"
        + (" and equals its sources bit for bit" if args.against_source else "")
    )


def _cmd_stats(args: argparse.Namespace) -> None:
    from pipeline.stats import shard_stats

    print(shard_stats(args.folder, progress=not args.quiet))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Offline stage: audio trees -> index.json -> uint16 tar shards.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "synth",
        help="write a deterministic synthetic stereo corpus (MUSDB layout)",
        description="Write OUT/{train,test}/<track>/mixture.* : stereo mixtures whose channels are "
        "related as in real mixes (panned, delayed, reverberated sources), in several formats.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder")
    p.add_argument("--tracks", type=int, default=8, help="number of tracks (default 8)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each track (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--sample-rate", type=int, default=44100, help="sample rate (default 44100)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "index",
        help="scan an audio tree into index.json (the lengths JSON)",
        description="Scan ROOT for audio files (.wav .flac .aif .aiff .ogg .opus .mp3, and with "
        "PyAV .m4a .mp4 .stem.mp4 .aac; any case) "
        "and write their readable frame counts, rates, channels and formats to a JSON index. "
        "Bad files are listed with a reason, never fatal. Unchanged files (same size and mtime) "
        "are not opened again.",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="folder that holds the audio")
    p.add_argument("--out", type=Path, help="index file (default shards/<ROOT name>/index.json)")
    p.add_argument("--jobs", type=int, help="worker processes (default: all cores)")
    p.add_argument(
        "--lengths-json",
        type=Path,
        metavar="F",
        help="also write the original trainer's {absolute path: frames} JSON to F",
    )
    p.add_argument(
        "--stems",
        choices=("mixture", "all", "sum"),
        default="mixture",
        help="multi-stream MP4 (.stem.mp4): index stream 0, the mixture (default); all: each "
        "stem as its own track FILE#STEM, kept in its song's split; sum: the mixture, and check "
        "that it equals the sum of the stems (one line per file)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser(
        "shard",
        help="cut the indexed files into uint16 chunk tar shards with a manifest",
        description="Cut every indexed file into consecutive CHUNK-frame stereo chunks (uint16 = "
        "int16 + 32768, [2, CHUNK] .npy + .json per chunk), split train/val/test by track "
        "folder, interleave chunks of many files, and write tar shards plus manifest.json. "
        "Same inputs and options give byte-identical shards; a re-run resumes.",
    )
    p.add_argument("index", type=Path, metavar="INDEX", help="index.json written by `index`")
    p.add_argument(
        "--out",
        type=str,  # not Path, which turns s3://bucket/x into s3:/bucket/x
        help="output folder or s3://bucket/prefix (default: the folder of INDEX)",
    )
    p.add_argument(
        "--chunk-frames",
        type=int,
        default=32768,
        help="frames per chunk; the loader crops windows up to this (default 32768)",
    )
    p.add_argument("--shard-bytes", default="256MB", help="target shard size (default 256MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of split hashing and interleaving")
    p.add_argument(
        "--val",
        type=float,
        default=0.1,
        help="fraction of track groups for val, besides val/ folders (default 0.1)",
    )
    p.add_argument(
        "--test",
        type=float,
        default=None,
        help="fraction for test besides test/ folders (default 0.1 when the tree "
        "has no test folder, else 0)",
    )
    p.add_argument(
        "--splits-from",
        type=Path,
        metavar="MANIFEST",
        help="keep the splits an earlier shard set forced (its manifest.json or folder) when "
        "val or test drew no group, so added files move no group (default: the set in --out)",
    )
    p.add_argument(
        "--channels",
        default="stereo",
        help="stereo (mono duplicated, >2 -> first two), pick:I,J, downmix, skip-mono",
    )
    p.add_argument(
        "--sample-rate",
        default=None,
        help="Hz to resample to, or `native` (refuse mixed rates); default: the most "
        "common rate by duration, others resampled with soxr",
    )
    p.add_argument(
        "--silence-db",
        type=float,
        default=-90.0,
        help="skip chunks whose peak is below this dBFS (default -90; -inf keeps all)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only files whose index path matches GLOB (repeatable)",
    )
    p.add_argument(
        "--group-by",
        default="parent",
        help="what a split keeps together: parent (folder, default), file, "
        "regex:PATTERN (first group of the match)",
    )
    p.add_argument(
        "--interleave",
        "--window",  # the old name, kept as an alias
        dest="interleave",
        type=int,
        default=16,
        help="files whose chunks are mixed at a time (default 16)",
    )
    p.add_argument(
        "--partition",
        metavar="I/N",
        help="write only part I of N (a job array; default: the array task's number from SLURM, "
        "SGE or STEREOTOK_PART_INDEX/COUNT; `none`: the whole set); join with `merge`",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add the index's new files to the set in --out as a new generation of shards; "
        "earlier shards stay byte for byte, earlier groups keep their splits; the options "
        "must be the set's (re-index the grown tree first)",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="with --append: allow files of earlier generations that are gone from the tree, "
        "and record them as gone (their chunks stay in the set's shards)",
    )
    p.add_argument("--jobs", type=int, help="worker processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser(
        "merge",
        help="join the manifests of --partition parts",
        description="Join manifest.part-I-of-N.json files into one manifest.json.",
    )
    p.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="folders of the parts")
    p.add_argument("--out", type=Path, help="where manifest.json goes (default: the first DIR)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "verify",
        help="check a shard set against its manifest (and its sources)",
        description="Check sha256 and size of every shard, that every member decodes, that only "
        ".npy/.json members exist with unique keys, and that counts match the manifest. With "
        "--against-source, every chunk must equal its source audio bit for bit (16-bit "
        "sources; others: the documented quantization). Exits non-zero, one line per problem.",
    )
    # a str: `s3://bucket/set` through Path would lose a slash
    p.add_argument("folder", metavar="DIR", help="folder (or s3:// prefix) holding manifest.json")
    p.add_argument(
        "--against-source",
        action="store_true",
        help="also re-read every chunk from the source audio and compare",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "stats",
        help="hours, tracks, chunks, shards, bytes and level histogram",
        description="Per split hours, tracks, chunks, shards and bytes, and a "
        "histogram of the token levels.",
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="folder holding manifest.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.func(args))
