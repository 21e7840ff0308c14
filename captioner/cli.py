"""The ``captioner`` command: batch captioning (``caption``), model description (``info``) and the HTTP
service (``serve``, which hands over to ``python -m service``).

Every foreseeable failure ends in a one-line message on stderr and a documented exit status; a
traceback means a bug.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captioner import __version__
from captioner.api import MODEL_DIR_VARIABLE, Captioner, default_model_dir, resolve_device
from captioner.attention_png import PANEL_SIZE, render_attention
from captioner.batch import (
    Decoded,
    InputError,
    JsonlOutput,
    Output,
    Progress,
    Record,
    Summary,
    attention_file_names,
    list_inputs,
    open_output,
    parse_shard,
    run_batches,
    select_shard,
    write_file_atomically,
)
from captioner.checkpoint import ModelInfo, read_info
from captioner.decoding import SearchOptions, sampling_generators
from captioner.encoder import grid_size_for
from captioner.errors import CheckpointError, OptionError
from captioner.images import load_image
from captioner.parquet_output import ParquetOutput

EXIT_OK, EXIT_IMAGES_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

EXIT_STATUS_HELP = f"""exit status:
  {EXIT_OK}    success (caption: every image was captioned)
  {EXIT_IMAGES_FAILED}    some images could not be read or decoded; they have error records, the others captions
  {EXIT_USAGE}    usage error: a bad option or value, a PATH that names nothing, CUDA asked for but absent,
       an --output file that is not a captioner output
  {EXIT_MODEL}    the model could not be loaded (missing or damaged model directory)
  {EXIT_OUTPUT}    the output could not be written (permission denied, disk full)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); run the same command again to resume"""

MAIN_HELP = f"""commands:
  caption   caption image files, folders and glob patterns in batches
  info      describe a model: architecture, vocabulary, training data, scores
  serve     start the HTTP service: runs `python -m service` with the remaining arguments
            (see `captioner serve --help`)

The model is read from --model DIR, else ${MODEL_DIR_VARIABLE}, else the packaged weights/default.

{EXIT_STATUS_HELP}"""

CAPTION_HELP = f"""inputs:
  PATH may be a file (taken whatever its extension), a folder (its images by extension:
  jpg jpeg png gif bmp webp tif tiff; hidden files skipped; sub-folders with --recursive) or a glob
  pattern, expanded by captioner itself so quoted patterns work ('photos/**/*.jpg'). Inputs are
  sorted and each file is captioned once. Each record's "path" is the path as found, normalised.

output:
  --output FILE.jsonl  one JSON object per line: {{"path", "caption", "score"}} (with "n_best":
                       [{{"caption", "score"}}] when --n-best > 1), or {{"path", "error": {{"code", "message"}}}}
  --output FILE.csv    columns path,caption,score,error (error is "code: message")
  no --output          "path<TAB>caption" lines on stdout, errors on stderr
  Error codes: empty, not_an_image, truncated, undecodable, too_many_pixels, too_costly, unreadable.
  score is log-probability / length**P (P = --length-penalty; 1: mean per word); higher is better.

resuming:
  Records are written a batch at a time and synced to disk, so a killed run loses at most one
  batch. Running the same command again with the same --output first removes an incomplete last
  line, then skips images that already have a caption record and retries those with an error
  record (the old error record is replaced), so the finished file has exactly one record per image.
  Records of paths that are not inputs of the run are kept untouched. Options are not compared:
  records made with other options are kept.

sharding:
  --shard I/N keeps the inputs whose path hashes (SHA-1 of the path string) to I modulo N, so N
  machines given the same PATH arguments split the work without coordination. Use one --output
  per shard.

attention pictures:
  --attention-dir DIR writes DIR/<stem>.attention.png per captioned image: the image and, for each
  word of the best caption, its attention map as a heat map (red = most attended). Repeated stems
  get -2, -3... in input order.

{EXIT_STATUS_HELP}"""

SERVE_HELP = "start the HTTP service (all further arguments go to `python -m service`)"


# -------------------------------------------------------------------------------------------- arguments


def _int_in(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {value}")
        return value

    return parse


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner",
        description="Caption images with a CNN encoder and an attention LSTM decoder (Show, Attend and Tell).",
        epilog=MAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{caption,info,serve}")

    caption = commands.add_parser(
        "caption",
        help="caption images in batches",
        description="Caption image files, folders and glob patterns in batches.",
        epilog=CAPTION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    caption.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    caption.add_argument("-r", "--recursive", action="store_true", help="look into sub-folders of folders")
    caption.add_argument(
        "--model", metavar="DIR", help=f"model directory (default: ${MODEL_DIR_VARIABLE} or weights/default)"
    )
    search = caption.add_argument_group("caption search")
    search.add_argument("--beam-size", type=int, default=3, metavar="K", help="beam width; 1 is greedy (default 3)")
    search.add_argument("--max-length", type=int, default=20, metavar="N", help="most words per caption (default 20)")
    search.add_argument(
        "--length-penalty", type=float, metavar="P", help="score = log p / length**P (default: the model's, else 1)"
    )
    search.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="never say the same N words twice in a caption; 0 turns it off (default: the model's, else 0)",
    )
    search.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="P",
        help="make words already said P times less likely (>= 1; 1 turns it off; default: the model's, else 1)",
    )
    search.add_argument("--sample", action="store_true", help="sample captions instead of searching")
    search.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature (with --sample; default 1)"
    )
    search.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest words (with --sample)")
    search.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="random seed for --sample: an image samples alike for the same S, options, model and "
        "position among the listed inputs, whatever --batch-size, --shard or a resumed run",
    )
    search.add_argument("--n-best", type=int, default=1, metavar="N", help="also record the N best captions (JSONL)")
    running = caption.add_argument_group("running")
    running.add_argument(
        "--batch-size", type=_int_in(1, 4096), default=32, metavar="N", help="images per model call (default 32)"
    )
    running.add_argument(
        "--workers",
        type=_int_in(0, 256),
        default=min(4, os.cpu_count() or 1),
        metavar="N",
        help="threads decoding images ahead of the model; 0 decodes in the main thread, for debugging "
        "(default: min(4, CPUs))",
    )
    running.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    running.add_argument("--shard", type=_shard, metavar="I/N", help="caption only shard I of N (0 <= I < N)")
    running.add_argument("--output", metavar="FILE", help="FILE.jsonl or FILE.csv; resumable (default: stdout)")
    running.add_argument("--attention-dir", metavar="DIR", help="write DIR/<stem>.attention.png per image")
    ray_engine = caption.add_argument_group('ray engine (needs the ray extra: pip install "captioner[ray]")')
    ray_engine.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="local: this process; ray: a Ray Data pipeline"
    )
    ray_engine.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join the Ray cluster at ADDR ('auto': this machine's); default: start a local one",
    )
    ray_engine.add_argument(
        "--actors", type=_int_in(1, 100000), metavar="N", help="caption actors (default: one per GPU, or per 8 CPUs)"
    )
    ray_engine.add_argument(
        "--gpus-per-actor", type=float, default=0.0, metavar="G", help="GPUs per actor; 0 captions on CPUs (default)"
    )
    caption.set_defaults(handler=_caption_command)

    info = commands.add_parser(
        "info",
        help="describe a model",
        description="Describe a model: name, architecture, vocabulary, training data, provenance and scores.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument(
        "--model", metavar="DIR", help=f"model directory (default: ${MODEL_DIR_VARIABLE} or weights/default)"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=_info_command)

    # Listed for --help only: main() hands "serve ..." to the service before argparse sees it.
    commands.add_parser("serve", help=SERVE_HELP, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["serve"]:
        _serve(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("captioner: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(status: int, message: str) -> int:
    print(f"captioner: error: {message}", file=sys.stderr)
    return status


def _serve(arguments: list[str]) -> None:
    """Replace this process by ``python -m service ARGS`` (the service lives outside this package)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "service", *arguments])


# ---------------------------------------------------------------------------------------------- caption


def _search_options(args: argparse.Namespace) -> dict[str, Any]:
    """The search options given on the command line (None: not given, the model's or the search's
    default applies), checked before the model loads."""
    if not args.sample and (args.temperature is not None or args.top_k is not None):
        raise OptionError("--temperature and --top-k only apply with --sample")
    given = {
        "beam_size": args.beam_size,
        "max_length": args.max_length,
        "n_best": args.n_best,
        "length_penalty": args.length_penalty,
        "sample": args.sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "repetition_penalty": args.repetition_penalty,
    }
    SearchOptions(**{name: value for name, value in given.items() if value is not None})
    return given


def _caption_command(args: argparse.Namespace) -> int:
    try:
        given_options = _search_options(args)
        output = open_output(args.output, sys.stdout, sys.stderr)
        if args.n_best > 1 and not isinstance(output, JsonlOutput | ParquetOutput):
            raise OptionError(
                "--n-best above 1 needs --output FILE.jsonl or DIR/*.parquet "
                "(CSV and stdout hold one caption per image)"
            )
        paths = _list_arguments(args)
        if not paths:
            raise InputError(
                f"no images found in {' '.join(args.paths)} (extensions: jpg jpeg png gif bmp webp tif tiff)"
            )
        attention_names = attention_file_names(paths) if args.attention_dir else {}
        # Sampling seeds each image from its place in the whole listing, which neither sharding nor
        # resuming changes.
        input_index = {path: index for index, path in enumerate(paths)}
        if args.shard is not None:
            paths = select_shard(paths, *args.shard)
        device = resolve_device(args.device)
    except (OptionError, InputError) as error:
        return _fail(EXIT_USAGE, str(error))
    if args.engine == "ray":
        return _caption_on_ray(args, given_options, output, paths, input_index)

    try:
        captioner = Captioner.from_pretrained(args.model, device=device)
    except (CheckpointError, OSError, ValueError) as error:
        hint = "" if args.model else f" (give --model DIR or set ${MODEL_DIR_VARIABLE})"
        return _fail(EXIT_MODEL, f"cannot load the model: {error}{hint}")
    options = captioner.search_options(**given_options)

    try:
        done = output.resume(set(paths))
    except InputError as error:
        return _fail(EXIT_USAGE, str(error))
    except OSError as error:
        return _fail(EXIT_OUTPUT, f"cannot open {args.output}: {error.strerror or error}")
    todo = [path for path in paths if path not in done]

    attention_dir = Path(args.attention_dir) if args.attention_dir else None
    progress = Progress(len(todo), sys.stderr)
    try:
        if attention_dir is not None:
            attention_dir.mkdir(parents=True, exist_ok=True)
        summary = run_batches(
            todo,
            decode=_decoder(captioner, keep_image=attention_dir is not None),
            caption_batch=_batch_captioner(captioner, options, args.seed, input_index, attention_dir, attention_names),
            output=output,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=progress,
        )
    except OSError as error:
        return _cannot_write(error, args.output)
    finally:
        progress.close()
        output.close()
    return _finished(summary, len(done), args.output)


def _cannot_write(error: OSError, output_name: str | None) -> int:
    where = error.filename or output_name or "the output"
    return _fail(EXIT_OUTPUT, f"cannot write {where}: {error.strerror or error}")


def _finished(summary: Summary, already_done: int, output_name: str | None) -> int:
    """Print the run's summary line; returns the exit status it earns."""
    summary.skipped = already_done
    print(_summary_line(summary, output_name), file=sys.stderr)
    return EXIT_IMAGES_FAILED if summary.failed else EXIT_OK


def _list_arguments(args: argparse.Namespace) -> list[str]:
    """The inputs the PATH arguments name; with ``--engine ray`` also URIs (``s3://``, ``file://``...),
    which the Ray engine reads through pyarrow's file systems."""
    uris = [argument for argument in args.paths if "://" in argument]
    if uris and args.engine != "ray":
        raise InputError(f"{uris[0]!r} is a URI: only --engine ray reads URIs; the local engine reads files")
    paths = list_inputs([argument for argument in args.paths if "://" not in argument], args.recursive)
    if uris:
        from captioner.distributed import list_uris

        paths += [name for uri in uris for name in list_uris(uri, args.recursive)]
    return paths


def _caption_on_ray(
    args: argparse.Namespace,
    given_options: dict[str, Any],
    output: Output,
    paths: list[str],
    input_index: dict[str, int],
) -> int:
    """``--engine ray``: the same resume step and records as the local engine, captioned by a Ray Data
    pipeline (captioner.distributed); the driver never loads the model."""
    from captioner.distributed import RayPlan, caption_paths

    try:
        if args.attention_dir:
            raise OptionError("--attention-dir is not available with --engine ray")
        plan = RayPlan(args.batch_size, args.actors, args.gpus_per_actor)
        read_info(args.model or default_model_dir())
        done = output.resume(set(paths))
    except (OptionError, InputError) as error:
        return _fail(EXIT_USAGE, str(error))
    except CheckpointError as error:
        return _fail(EXIT_MODEL, f"cannot read the model: {error}")
    except OSError as error:
        return _fail(EXIT_OUTPUT, f"cannot open {args.output}: {error.strerror or error}")
    todo = [path for path in paths if path not in done]
    progress = Progress(len(todo), sys.stderr)
    try:
        address, seed = args.ray_address, args.seed
        summary = caption_paths(
            todo, output, progress, args.model, address=address, search=given_options, seed=seed, plan=plan,
            indices=[input_index[path] for path in todo],
        )  # fmt: skip
    except OptionError as error:
        return _fail(EXIT_USAGE, str(error))
    except OSError as error:
        return _cannot_write(error, args.output)
    finally:
        progress.close()
        output.close()
    return _finished(summary, len(done), args.output)


Pixels = tuple[torch.Tensor, Image.Image | None]


def _decoder(captioner: Captioner, keep_image: bool) -> Callable[[str], Pixels]:
    """The function the decoding threads run: path -> (model input, small copy of the image for the
    attention picture, if one is wanted)."""

    def decode(path: str) -> Pixels:
        if not keep_image:
            return captioner.preprocess(path), None
        image = load_image(path, min_size=max(captioner.info.preprocessing.image_size, PANEL_SIZE))
        return captioner.preprocess(image), image.resize((PANEL_SIZE, PANEL_SIZE), Image.Resampling.BILINEAR)

    return decode


def _batch_captioner(
    captioner: Captioner,
    options: SearchOptions,
    seed: int | None,
    input_index: dict[str, int],
    attention_dir: Path | None,
    attention_names: dict[str, str],
) -> Callable[[list[Decoded[Pixels]]], list[Record]]:
    """The function that captions one batch of decoded images (in the main thread) and draws their
    attention pictures. With a seed, each image samples from its own generator, seeded from the seed
    and the image's ``input_index``."""

    def caption_batch(items: list[Decoded[Pixels]]) -> list[Record]:
        decoded = [item.value for item in items if item.value is not None]  # run_batches passes decoded items only
        pixels = torch.stack([tensor for tensor, _ in decoded]).to(captioner.device)  # (N, 3, S, S)
        generators = (
            sampling_generators(seed, [input_index[item.path] for item in items], captioner.device)
            if seed is not None
            else None
        )
        results = captioner.caption_pixels(pixels, options, generators)
        records = []
        for item, (_, thumbnail), result in zip(items, decoded, results, strict=True):
            if attention_dir is not None and thumbnail is not None:
                # Written before the batch's records: a record on disk implies its picture exists.
                picture = render_attention(thumbnail, result.words, result.attention)
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                write_file_atomically(attention_dir / attention_names[item.path], buffer.getvalue(), durable=False)
            alternatives = [(c.caption, round(c.score, 6)) for c in result.n_best] if options.n_best > 1 else None
            records.append(Record(item.path, result.caption, round(result.score, 6), alternatives))
        return records

    return caption_batch


def _summary_line(summary: Summary, output: str | None) -> str:
    failed = f"{summary.failed} failed"
    if summary.errors:
        failed += " (" + ", ".join(f"{code}: {n}" for code, n in sorted(summary.errors.items())) + ")"
    rate = summary.captioned / summary.seconds if summary.seconds > 0 else 0.0
    skipped = f", {summary.skipped} already in {output}" if output else ""
    return f"captioner: {summary.captioned} captioned, {failed}{skipped}; {summary.seconds:.1f} s, {rate:.1f} images/s"


# ------------------------------------------------------------------------------------------------- info


def describe_model(info: ModelInfo) -> dict[str, Any]:
    """What ``captioner info`` reports, as plain JSON-ready data."""
    grid = grid_size_for(info.config.encoder)
    return {
        "name": info.name,
        "version": info.version,
        "backbone": info.config.encoder.backbone,
        "image_size": info.preprocessing.image_size,
        "grid_size": grid,
        "regions": grid * grid,
        "vocabulary_size": len(info.vocabulary),
        "encoder": info.config.to_dict()["encoder"],
        "decoder": info.config.to_dict()["decoder"],
        "decoding": info.decoding,
        "preprocessing": info.preprocessing.to_json(),
        "training_data": info.provenance.get("data"),
        "provenance": info.provenance,
        "metrics": info.metrics,
    }


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> ("a.b", value) pairs, for the text listing."""
    if isinstance(value, dict):
        pairs = []
        for key, inner in value.items():
            pairs.extend(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return pairs
    return [(prefix, value)]


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return value if isinstance(value, str) else json.dumps(value)


def format_model(description: dict[str, Any]) -> str:
    d = description["decoder"]
    layers = f"{d['num_layers']} layer{'s' if d['num_layers'] != 1 else ''}"
    extras = [name for name, on in (("deep output", d["deep_output"]), ("gate", d["gate"])) if on]
    decoder = (
        f"{d['cell']}, {layers}, embedding {d['embed_dim']}, attention {d['attention_dim']} ({d['attention']}), "
        f"hidden {d['hidden_dim']}, " + ", ".join([*extras, f"dropout {d['dropout']}"])
    )
    weights = description["encoder"].get("weights")
    lines = [
        f"name:           {description['name']}",
        f"version:        {description['version']}",
        f"backbone:       {description['backbone']} (input {description['image_size']} px, "
        f"pretrained weights: {weights or 'none'}, fine-tuned stages: {description['encoder']['fine_tune_stages']})",
        f"grid:           {description['grid_size']}x{description['grid_size']} "
        f"({description['regions']} regions of {d['feature_dim']} features)",
        f"vocabulary:     {description['vocabulary_size']} tokens",
        f"decoder:        {decoder}",
        "decoding:       "
        + (", ".join(f"{key} {value}" for key, value in description["decoding"].items()) or "the search's defaults"),
        f"training data:  {_text(description['training_data']) if description['training_data'] else 'not recorded'}",
        "provenance:",
        *(f"  {key}: {_text(value)}" for key, value in _flatten(description["provenance"])),
        "metrics:",
        *(f"  {key}: {_text(value)}" for key, value in _flatten(description["metrics"])),
    ]
    if not description["provenance"]:
        lines.insert(lines.index("provenance:") + 1, "  not recorded")
    if not description["metrics"]:
        lines.append("  none recorded")
    return "\n".join(lines)


def _info_command(args: argparse.Namespace) -> int:
    directory = Path(args.model) if args.model else default_model_dir()
    try:
        info = read_info(directory)
    except CheckpointError as error:
        hint = "" if args.model else f" (give --model DIR or set ${MODEL_DIR_VARIABLE})"
        return _fail(EXIT_MODEL, f"cannot read the model: {error}{hint}")
    description = describe_model(info)
    print(json.dumps(description, indent=2) if args.json else format_model(description))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
