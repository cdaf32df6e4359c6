"""`medico-peft convert`: image/label volumes -> HDF5 shards + manifest.json."""

from __future__ import annotations

import argparse

from ..data.shard_format import COMPRESSIONS, DEFAULT_COMPRESSION
from ..errors import ConfigError

BUILTINS = ("colin27-aal", "mni152")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert NIfTI/NumPy/PNG/TIFF/DICOM volumes + labels into training shards",
        description="Pairs files by stem (--images/--labels) or from --pairs (one 'image,label' per line). "
                    "See docs/shard_format.md.",
    )
    src = p.add_argument_group("inputs")
    src.add_argument("--images", help="folder of image files (or DICOM series sub-folders)")
    src.add_argument("--labels", help="folder of label files with matching stems")
    src.add_argument("--pairs", help="text file with one 'image,label' pair per line")
    src.add_argument("--builtin", choices=BUILTINS, help="convert shipped real data instead of files")
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shard set in a non-empty --out folder (the old set stays loadable until "
                        "the new one is complete; other files there are kept)")
    p.add_argument("--modality", default="mr", choices=("ct", "mr", "other"))
    p.add_argument("--normalization", help="ct_soft_tissue|ct_lung|ct_bone|ct_brain|mr_percentile|minmax")
    p.add_argument("--size", type=int, default=256, help="model input size (256 LiteMedSAM, 1024 SAM)")
    p.add_argument("--axis", type=int, default=2, help="slicing axis of 3D volumes")
    p.add_argument("--empty-share", type=float, default=0.1, help="share of label-free slices kept")
    p.add_argument("--min-area", type=int, default=10, help="drop objects smaller than this (pixels at --size)")
    p.add_argument("--split", help="volume | slab | train | val | test (default: volume; slab for --builtin)")
    p.add_argument("--split-fractions", default="0.7,0.15,0.15", help="train,val,test for --split volume")
    p.add_argument("--slab-fractions", help="train,val,test for --split slab (default 0.6,0,0.3; "
                                             "--builtin: 0.5,0.15,0.3)")
    p.add_argument("--slab-gap", type=int, help="slices between slabs (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", default=DEFAULT_COMPRESSION, choices=COMPRESSIONS,
                   help=f"HDF5 filter of the shards (default {DEFAULT_COMPRESSION}: fast to decode; see docs/shard_format.md)")
    p.add_argument("--max-samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-mb", type=float, default=512.0)
    p.add_argument("--workers", type=int, default=0, help="processes converting volumes in parallel")
    lab = p.add_argument_group("label selection")
    lab.add_argument("--label-names", help="text file 'id name ...' per line (e.g. aal.nii.txt)")
    lab.add_argument("--keep", help="comma-separated ids or name globs to keep, e.g. 'Thalamus*,Caudate*'")
    lab.add_argument("--merge", action="append", default=[],
                     help="TARGET=SRC1,SRC2 (ids or globs); TARGET is a new name or id; repeatable")
    lab.add_argument("--rename", action="append", default=[], help="ID=NAME; repeatable")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data import real_data
    from ..data.convert import convert
    from ..data.labels import parse_label_items, parse_label_selection
    from ..data.pairing import pair_by_stem, read_pairs_file
    from ..utils.paths import prepare_output_dir

    options = dict(
        modality=args.modality, normalization=args.normalization, size=args.size, axis=args.axis,
        empty_share=args.empty_share, min_area=args.min_area, split=args.split,
        split_fractions=args.split_fractions, slab_fractions=args.slab_fractions, slab_gap=args.slab_gap,
        seed=args.seed, compression=args.compression, max_samples_per_shard=args.max_samples_per_shard,
        max_shard_mb=args.max_shard_mb, workers=args.workers, progress=not args.no_progress,
    )
    for key in ("slab_fractions", "slab_gap"):  # unset: the builtin's or convert's own default
        if options[key] is None:
            del options[key]
    if args.builtin:
        prepare_output_dir(args.out, args.overwrite)
        options.pop("modality")
        options["split"] = args.split or "slab"
        if args.builtin == "colin27-aal":
            report = real_data.build_colin27_aal_shards(args.out, labels=parse_label_items(args.keep), **options)
        else:
            report = real_data.build_mni152_shards(args.out, **options)
    else:
        if args.pairs:
            pairs = read_pairs_file(args.pairs)
        elif args.images and args.labels:
            pairs = pair_by_stem(args.images, args.labels)
        else:
            raise ConfigError("convert: give --images DIR --labels DIR, or --pairs FILE, or --builtin NAME")
        prepare_output_dir(args.out, args.overwrite)  # after the inputs are known to be given
        options["split"] = args.split or "volume"
        selection = parse_label_selection(args.keep, args.merge, args.rename, args.label_names)
        report = convert(pairs, args.out, labels=selection, **options)
    counts = ", ".join(f"{s} {n}" for s, n in report.samples.items())
    print(f"wrote {report.manifest_path} ({counts} slices) in {report.seconds:.1f}s")
    for line in report.skipped_volumes:
        print(f"skipped {line}")
    return 0
