"""`python -m lora_trainer caption ...`: autotag a folder from the command line.

Exit status: 0 when every image was handled, 1 when some images could not be read (the others were
captioned), 2 when nothing could run (bad arguments, no tagger, no images, an unreadable metadata.csv).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .autotag import MODES, autotag_folder
from .backends import DEFAULT_MODEL, TaggerUnavailable, load_backend
from .images import image_extensions, list_images
from .taggers import ClipTagger
from .vocab import VocabularyError, load_vocabulary
from .writers import CsvWriter, UnreadableCaption


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_caption_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--input", "-i", required=True, metavar="FOLDER",
                        help="folder of images (subfolders such as 10_name/ included)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", "-o", metavar="CSV",
                       help="write captions into this metadata.csv (file_name,caption)")
    where.add_argument("--sidecar", action="store_true",
                       help="write a caption file beside each image (default, unless FOLDER/metadata.csv exists)")
    parser.add_argument("--mode", choices=MODES, default="tags",
                        help="tags: comma-separated tags; caption: a short sentence (default: tags)")
    parser.add_argument("--threshold", type=_unit_float, default=0.3,
                        help="keep tags whose probability within their category, against 'none of these', is "
                             "at least this (0-1, default 0.3)")
    parser.add_argument("--prefix", default="", help="trigger word(s) put first in every caption")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--overwrite", action="store_true", help="replace existing captions")
    policy.add_argument("--append", action="store_true",
                        help="add new tags to existing captions (no duplicates)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"CLIP model: open_clip:ARCH/PRETRAINED or hf:REPO_OR_FOLDER (default {DEFAULT_MODEL})")
    parser.add_argument("--top-k", type=_positive_int, default=None, help="at most N tags per image")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch (default 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--caption-extension", default=".txt", help="extension of sidecar files (default .txt)")
    parser.add_argument("--vocab", metavar="FOLDER", default=None,
                        help="your own vocabulary: a folder of .txt files, one term per line (see caption/vocab)")
    return parser


def _progress_bar():
    from tqdm import tqdm

    bar = tqdm(unit="img", desc="autotag", dynamic_ncols=True, file=sys.stderr)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    return bar, update


def run_caption(args: argparse.Namespace, tagger=None) -> int:
    """Runs the caption command; `tagger` replaces the one `--model` names (the WebUI tab, tests)."""

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    folder = Path(args.input)
    if not folder.is_dir():
        return fail(f"--input {folder} is not a folder")
    if args.output:
        destination, csv_path = "csv", Path(args.output)
    elif not args.sidecar and (folder / "metadata.csv").is_file():
        destination, csv_path = "csv", folder / "metadata.csv"
    else:
        destination, csv_path = "sidecar", None
        if (folder / "metadata.csv").is_file():
            print(f"note: {folder / 'metadata.csv'} exists; in training its rows take priority over sidecar files",
                  file=sys.stderr)
    policy = "overwrite" if args.overwrite else "append" if args.append else "keep"
    if csv_path is not None:
        try:
            CsvWriter(csv_path, folder)  # an unreadable CSV is reported before a model is loaded
        except UnreadableCaption as e:
            return fail(str(e))
    if not list_images(folder):
        return fail(f"no images in {folder} or its subfolders (looked for {', '.join(image_extensions())})")
    if tagger is None:
        try:
            vocabulary = load_vocabulary(args.vocab)
            tagger = ClipTagger(load_backend(args.model, device=args.device), vocabulary)
        except (TaggerUnavailable, VocabularyError) as e:
            return fail(str(e))

    bar, update = _progress_bar()
    try:
        result = autotag_folder(folder, tagger=tagger, threshold=args.threshold, prefix=args.prefix, mode=args.mode,
                                destination=destination, policy=policy, progress=update, top_k=args.top_k,
                                batch_size=args.batch_size, csv_path=csv_path,
                                caption_extension=args.caption_extension,
                                log=lambda message: bar.write(message, file=sys.stderr))
    finally:
        bar.close()

    print(result.summary())
    if result.kept:
        print(f"{result.kept} images already had captions and were left as they were "
              "(--overwrite replaces them, --append adds the new tags)")
    return 1 if result.failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = add_caption_arguments(argparse.ArgumentParser(prog="lora_trainer caption",
                                                           description="Autotag a folder of images."))
    return run_caption(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
