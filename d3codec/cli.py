"""The `d3codec` command line: click commands that parse options and call the library.

Every command turns a `D3Error` into one line on stderr (`error: ...`) and exit status 1;
usage errors exit 2 (click); Ctrl-C exits 130. No traceback reaches the user for bad input.

Commands import the library (and numpy) inside their bodies: the library loads torch, and
`d3codec --help`, `--version` and usage errors answer without torch or numpy. Only modules free
of both are imported at the top.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional

import click

from d3codec._malloc import keep_freed_memory, use_huge_pages
from d3codec._paths import check_output_file
from d3codec._version import __version__
from d3codec.errors import ConfigError, D3Error


class _Group(click.Group):
    """A click group that reports `D3Error` as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except D3Error as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="d3codec")
def cli() -> None:
    """d3codec: compress a labelled image dataset into one small .d3 file (D3 distillation),
    and draw training batches from it.

    \b
    Typical use:
      d3codec encode digits --budget 1ipc -o digits.d3   # distil the embedded dataset
      d3codec info digits.d3                             # what is inside, byte by byte
      d3codec eval digits.d3 --test digits               # what it is worth
    """


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    keep_freed_memory()
    use_huge_pages()  # before anything imports torch
    cli.main(args=argv, prog_name="d3codec")


def _resolve_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--device as the concrete device that will run ("auto" -> cuda or cpu), checked at parse time:
    an unknown name or CUDA where there is none fails as one `error:` line before any work."""
    from d3codec.decode.decoders import check_device

    return str(check_device(value))


_device_option = click.option(
    "--device", default="auto", show_default=True, callback=_resolve_device,
    help="auto: CUDA when torch sees a GPU, else the CPU; or cpu, cuda, cuda:N. Byte-identical "
         "results for a seed are promised on the CPU (--device cpu).")


def _own_class_weight(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    """--own-class-weight: `auto`, or a number in 0..1."""
    if value == "auto":
        return value
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not 0.0 <= weight <= 1.0:
        raise click.BadParameter(f"{value!r} is neither auto nor a number in 0..1")
    return weight


# ---- commands are added below, one section per command ----


# ---- info, verify: look inside .d3 files (format/) ----

@cli.command("info")
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def info_cmd(file: str, as_json: bool) -> None:
    """Summarise a .d3 file: dataset, priors, decoders, labels, budget, and a byte breakdown
    whose parts add up exactly to the file size."""
    from d3codec.format.io import load
    from d3codec.format.summary import describe, render

    d3 = load(file)
    if as_json:
        click.echo(json.dumps(describe(d3), sort_keys=True))
    else:
        click.echo(render(d3, file))


@cli.command("verify")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing for valid files.")
def verify_cmd(files: tuple[str, ...], quiet: bool) -> None:
    """Check .d3 files fully (checksum, header, every tensor, and that this d3codec builds every
    decoder from its family, version, hparams and weights). Exit 0 when all are valid, else exit 1
    with one `error: FILE: reason` line per bad file on stderr."""
    from d3codec.decode.decoders import check_decoders
    from d3codec.format.io import load

    bad = 0
    for file in files:
        try:
            d3 = load(file)
            check_decoders(d3)
        except D3Error as exc:
            bad += 1
            message = str(exc)
            if not message.startswith(f"{file}:"):
                message = f"{file}: {message}"
            click.echo(f"error: {message}", err=True)
        else:
            if not quiet:
                click.echo(f"ok: {file} ({d3.file_bytes:,} bytes)")
    if bad:
        sys.exit(1)


# ---- experts, eval: expert trajectories and what a file is worth (data/, encode/experts, evaluate/) ----

def _parse_classes(text: Optional[str]) -> Optional[list[int]]:
    """`0,1,2` or `0-4` or `0-4,7` -> class ids."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ConfigError(f"cannot read --classes {text!r}; write ids like 0,1,2 or ranges like 0-4") from None
    return out


def _open_split(spec: str, split: str, data_dir: Optional[str], resolution: Optional[int],
                skip_bad_images: bool, cache_dir: Optional[str], quiet: bool) -> Any:
    from d3codec.data import open_dataset

    ds = open_dataset(spec, data_dir=data_dir, split=split, resolution=resolution,
                      skip_bad_images=skip_bad_images, cache_dir=cache_dir, progress=not quiet)
    if ds.skipped_images and not quiet and split == "train":
        names = ds.skipped_images
        click.echo(f"skipped {len(names)} unreadable image(s): {', '.join(names[:5])}"
                   + (" ..." if len(names) > 5 else ""), err=True)
    if ds.conversion_note and split == "train":
        click.echo(f"note: {ds.conversion_note}", err=True)
    return ds


def _data_options(f: Any) -> Any:
    for option in reversed([
        click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with a builtin dataset's files."),
        click.option("--resolution", type=click.IntRange(min=1), help="Resize images to N x N (default: native size)."),
        click.option("--skip-bad-images", is_flag=True, help="Leave out unreadable images instead of stopping."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Cache folder (default: $D3CODEC_CACHE or ~/.cache/d3codec)."),
    ]):
        f = option(f)
    return f


@cli.command("experts")
@click.argument("dataset", metavar="DATASET")
@_data_options
@click.option("--experts", "num_experts", type=click.IntRange(min=1), default=5, show_default=True,
              help="Number of experts.")
@click.option("--expert-epochs", "epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Epochs per expert.")
@click.option("--classes", help="Train on a class subset (subtask), e.g. 0-4 or 0,3,7.")
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--batch", "batch_size", type=int, default=256, show_default=True)
@click.option("--momentum", type=float, default=0.0, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--no-augment", is_flag=True, help="Train without DSA.")
@click.option("--width", type=int, default=128, show_default=True, help="ConvNet width.")
@click.option("--depth", type=int, help="ConvNet depth (default: from the resolution).")
@click.option("--seed", type=int, default=0, show_default=True)
@_device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def experts_cmd(dataset: str, data_dir: Optional[str], resolution: Optional[int], skip_bad_images: bool,
                cache_dir: Optional[str], num_experts: int, epochs: int, classes: Optional[str], lr: float,
                batch_size: int, momentum: float, weight_decay: float, no_augment: bool, width: int,
                depth: Optional[int], seed: int, device: str, as_json: bool, quiet: bool) -> None:
    """Train ConvNet experts on DATASET's train split and save every epoch's parameters
    (the trajectories distillation matches). Cached by data, classes and settings; an
    interrupted run resumes. Reports each expert's accuracy on the test split."""
    import numpy as np

    from d3codec.distill.experts import ensure_experts

    train = _open_split(dataset, "train", data_dir, resolution, skip_bad_images, cache_dir, quiet)
    test = _open_split(dataset, "test", data_dir, resolution, skip_bad_images, cache_dir, True)
    experts = ensure_experts(train, num_experts=num_experts, epochs=epochs, classes=_parse_classes(classes),
                             seed=seed, lr=lr, batch_size=batch_size, momentum=momentum,
                             weight_decay=weight_decay, augment=not no_augment, width=width, depth=depth,
                             cache_dir=cache_dir, device=device, test_dataset=test, progress=not quiet)
    rows = experts.report()
    accs = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    if as_json:
        click.echo(json.dumps({"path": experts.path, "dataset": train.name, "classes": experts.classes,
                               "num_experts": experts.num_experts, "epochs": experts.num_epochs,
                               "num_params": experts.num_params, "experts": rows}, sort_keys=True))
        return
    click.echo(f"{experts.num_experts} experts x {experts.num_epochs} epochs on {train.name} "
               f"({len(experts.classes)} classes, {experts.num_params:,} parameters) in {experts.path}")
    for r in rows:
        acc = "n/a" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
        click.echo(f"  expert {r['expert']}: held-out accuracy {acc}")
    if accs:
        held = " (held out of the source's training images)" if test.test_held_out else ""
        click.echo(f"  mean {100 * np.mean(accs):.2f}% +- {100 * np.std(accs):.2f} on {len(test):,} test images{held}")


@cli.command("eval")
@click.argument("file", required=False, metavar="FILE")
@click.option("--test", "test_spec", required=True, metavar="DATASET", help="Dataset whose test split is scored.")
@click.option("--baseline", type=click.Choice(["random", "png", "jpeg", "webp"]),
              help="Evaluate random real images at --budget bytes instead of a FILE.")
@click.option("--train", "train_spec", metavar="DATASET", help="Dataset the baseline draws from (its train split).")
@click.option("--budget", help="Baseline byte budget: 2ipc, 2ipc-u8, 31360, 500KB, 1.5MiB.")
@click.option("--quality", type=int, help="JPEG/WebP quality of the baseline (default 90).")
@_data_options
@click.option("--model", type=click.Choice(["convnet", "resnet18"]), default="convnet", show_default=True)
@click.option("--epochs", type=int, default=300, show_default=True,
              help="Passes over the data (a .d3 file: every component's mean image and one draw, at least one batch).")
@click.option("--steps", type=int, help="Train exactly N SGD steps instead of --epochs (equal compute for files "
              "and baselines of any size).")
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--batch", "batch_size", type=int, default=256, show_default=True)
@click.option("--no-augment", is_flag=True, help="Train without DSA.")
@click.option("--seed", type=int, default=0, show_default=True)
@_device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(file: Optional[str], test_spec: str, baseline: Optional[str], train_spec: Optional[str],
             budget: Optional[str], quality: Optional[int], data_dir: Optional[str], resolution: Optional[int],
             skip_bad_images: bool, cache_dir: Optional[str], model: str, epochs: int, steps: Optional[int],
             runs: int, lr: float, batch_size: int, no_augment: bool, seed: int, device: str, as_json: bool, quiet: bool) -> None:
    """Train fresh networks only on FILE (a .d3) and report final top-1 accuracy on the real
    test split (mean, std over runs) beside storage and compute; or, with --baseline, the same
    for random real images that fit in --budget bytes (uint8, PNG, JPEG or WebP)."""
    from d3codec.evaluate import Recipe, evaluate_baseline, evaluate_file, render, to_json

    recipe = Recipe(model=model, epochs=epochs, steps=steps, runs=runs, lr=lr, batch_size=batch_size,
                    augment=not no_augment, seed=seed)
    recipe.validate()
    if baseline is None:
        if file is None:
            raise ConfigError("give a .d3 FILE to evaluate, or --baseline with --train and --budget")
        if train_spec or budget or quality is not None:
            raise ConfigError("--train, --budget and --quality go with --baseline; leave them out for a FILE")
        test = _open_split(test_spec, "test", data_dir, resolution, skip_bad_images, cache_dir, quiet)
        report = evaluate_file(file, test, recipe, device=device, progress=not quiet)
    else:
        if file is not None:
            raise ConfigError("give either a FILE or --baseline, not both")
        if not train_spec or not budget:
            raise ConfigError("--baseline needs --train DATASET and --budget B (e.g. 10ipc or 31360)")
        from d3codec.format.budget import check_budget, parse_budget

        check_budget(budget)

        train = _open_split(train_spec, "train", data_dir, resolution, skip_bad_images, cache_dir, quiet)
        test = _open_split(test_spec, "test", data_dir, resolution, skip_bad_images, cache_dir, quiet)
        nbytes = parse_budget(budget, train.num_classes, train.image_shape).bytes
        report = evaluate_baseline(baseline, train, test, nbytes, recipe, quality=quality, device=device,
                                   progress=not quiet)
        report["storage"]["budget_spec"] = budget
    click.echo(to_json(report) if as_json else render(report))


# ---- encode: distil a dataset into a .d3 file (encode/) ----

@cli.command("encode")
@click.argument("dataset", metavar="DATASET")
@click.option("--budget", required=True, help="Byte budget: 1ipc, 10ipc, 2ipc-u8, 31360, 500KB, 1.5MiB.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="The .d3 file to write.")
@_data_options
@click.option("--objective", type=click.Choice(["auto", "mtt+mmd", "mmd", "mtt"]), default="auto", show_default=True,
              help="auto: mtt+mmd (the paper's) on CUDA, mmd on CPU.")
@click.option("--iterations", type=click.IntRange(min=0), help="Distillation iterations of the objective, after "
              "the fit (0: the fit alone; default: 10000 on CUDA, 100 on CPU).")
@click.option("--fit-steps", type=click.IntRange(min=0), help="Iterations fitting decoder and latent means to K real "
              "images per "
              "class before the objective (0: start from random latents, as the paper).  [default: 1000]")
@click.option("--seed", type=int, default=0, show_default=True)
@_device_option
@click.option("--classes", help="Distil a class subset (subtask), e.g. 0-4 or 0,3,7.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.ckpt (to the identical file).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Iterations between checkpoints (0: only on Ctrl-C).")
@click.option("--dry-run", is_flag=True, help="Print the plan, byte breakdown and an estimate of time and peak memory on this "
              "machine (from a short timed probe), then stop.")
@click.option("--weights-dtype", type=click.Choice(["I8", "F16", "F32"]), default="I8", show_default=True,
              help="Storage of decoder weights.")
@click.option("--latent-dtype", type=click.Choice(["I8", "F16", "F32"]), default="I8", show_default=True,
              help="Storage of latent means and log-variances.")
@click.option("--labels", type=click.Choice(["auto", "soft", "hard"]), default="auto", show_default=True,
              help="Component labels. hard: each component's class (0 bytes, so more components fit). "
                   "soft: the teacher's probabilities (the paper's). auto: soft when the teacher trains "
                   "for at least 1,000 SGD steps (the GPU default), else hard: a teacher trained for "
                   "about an epoch, as on CPU, caps the student near its own accuracy (RESULTS.md). "
                   "With --subtasks, auto is soft, from a teacher over all classes trained for at least 1,000 "
                   "steps: the labels are what relates classes of different subtasks.")
@click.option("--own-class-weight", default="auto", show_default=True, callback=_own_class_weight,
              metavar="auto|W",
              help="With soft labels: store each component's label as W x its own class + (1 - W) x the "
                   "teacher's probabilities (0: the teacher's alone, the paper's). auto: W = 0.8 when the "
                   "teacher's top class is the component's own for under 25% of the components (a teacher "
                   "that hardly knows them gives labels near uniform), else 0; the encode logs both.")
@click.option("--latents-per-class", type=click.IntRange(min=1), help="K, at least 1 (default: planned).")
@click.option("--latent-dim", type=click.IntRange(min=1), help="D, at least 1 (default: planned).")
@click.option("--width", type=click.IntRange(min=1), help="Decoder width (default: the widest that fits).")
@click.option("--experts", "num_experts", type=click.IntRange(min=1),
              help="Experts to train/reuse, at least 1 (default: 1 on CPU for mmd).")
@click.option("--expert-epochs", type=click.IntRange(min=1), help="Epochs per expert, at least 1 (default: planned).")
@click.option("--unroll", type=click.Choice(["exact", "tesla", "naive"]), help="Trajectory-matching gradient.")
@click.option("--subtasks", type=click.IntRange(min=1), help="Federated: split the classes into N subtasks (own "
              "experts, decoder, budget share), run them in parallel ranks, merge into one file. Each subtask does "
              "its share of one single-task encode's work (fit steps, expert images, MMD draws per class).")
@click.option("--subtask", type=click.IntRange(min=0), help="With --subtasks: run only subtask I and write its part "
              "file to -o "
              "(batch-cluster jobs; then d3codec merge).")
@click.option("--split", type=click.Choice(["contiguous", "balanced"]), help="With --subtasks: contiguous class "
              "ranges (default, as the paper) or balanced by image count.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --subtasks: local processes (under torchrun the ranks are the processes). "
                   "More ranks than subtasks share each subtask's expert training; the file is the same.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads, at least 1 (default: torch's).")
@click.option("-q", "--quiet", is_flag=True, help="No plan, no progress bars.")
def encode_cmd(dataset: str, budget: str, output: Optional[str], data_dir: Optional[str], resolution: Optional[int],
               skip_bad_images: bool, cache_dir: Optional[str], objective: str, iterations: Optional[int],
               fit_steps: Optional[int], seed: int, device: str, classes: Optional[str], resume: bool, checkpoint_every: int, dry_run: bool,
               weights_dtype: str, latent_dtype: str, labels: str, own_class_weight: Any,
               latents_per_class: Optional[int], latent_dim: Optional[int], width: Optional[int],
               num_experts: Optional[int],
               expert_epochs: Optional[int], unroll: Optional[str], subtasks: Optional[int], subtask: Optional[int],
               split: Optional[str], nproc: int, threads: Optional[int], quiet: bool) -> None:
    """Distil DATASET's train split into one .d3 file of at most --budget bytes (D3: K Gaussian
    latents per class and a decoder). Prints the plan, byte breakdown and a time and memory estimate
    first (and the time taken at the end); Ctrl-C saves a
    checkpoint that --resume continues from. On CPU the same seed gives byte-identical files for the same
    torch version, CPU capability and --threads (also those of cached experts it reuses); `d3codec info`
    shows what a file was encoded with."""
    from d3codec.distill.api import EncodeOptions, encode
    from d3codec.format.budget import check_budget

    if not dry_run and not output:
        raise ConfigError("give an output file with -o/--output (or use --dry-run)")
    check_budget(budget)
    federated = subtasks is not None or subtask is not None or split is not None or nproc != 1
    if not dry_run:  # before the data is decoded: nothing found late, no input overwritten
        from d3codec.data.sources import BUILTINS
        from d3codec.distill.api import check_output

        source = None if dataset in BUILTINS else dataset  # a builtin name is never a path
        check_output(output, inputs=[source, data_dir], resume=None if federated else resume)
    if threads:
        import torch

        torch.set_num_threads(threads)
    train = _open_split(dataset, "train", data_dir, resolution, skip_bad_images, cache_dir, quiet)
    options = EncodeOptions(objective=objective, iterations=iterations, fit_steps=fit_steps, seed=seed, device=device,
                            classes=_parse_classes(classes), resume=resume, checkpoint_every=checkpoint_every,
                            dry_run=dry_run, quiet=quiet and not dry_run, weight_dtype=weights_dtype,
                            latent_dtype=latent_dtype, labels=labels, own_class_weight=own_class_weight,
                            latents_per_class=latents_per_class,
                            latent_dim=latent_dim, width=width, num_experts=num_experts,
                            expert_epochs=expert_epochs, cache_dir=cache_dir,
                            overrides={"unroll": unroll} if unroll else {})
    if federated:
        _encode_federated(dataset, train, budget, output, options, data_dir=data_dir, resolution=resolution,
                          skip_bad_images=skip_bad_images, cache_dir=cache_dir, subtasks=subtasks, subtask=subtask,
                          split=split, nproc=nproc, threads=threads)
        return
    encode(train, budget, output, options)


# ---- federated encode (--subtasks/--subtask/--split/--nproc) and merge (distill/federated, encode/merge) ----

def _encode_federated(spec: str, train: Any, budget: str, output: Optional[str], options: Any, *,
                      data_dir: Optional[str], resolution: Optional[int], skip_bad_images: bool,
                      cache_dir: Optional[str], subtasks: Optional[int], subtask: Optional[int],
                      split: Optional[str], nproc: int, threads: Optional[int]) -> None:
    """`encode --subtasks K`: serially, with --nproc local processes, or as this torchrun rank."""
    from d3codec.distill.federated import encode_federated
    from d3codec.distill.merge import DataSpec

    if subtasks is None:
        raise ConfigError("--subtask, --split and --nproc go with --subtasks N; add --subtasks")
    if threads:
        raise ConfigError("--threads does not apply with --subtasks: each process computes with one thread so that "
                          "results do not depend on the rank count; use --nproc N (or torchrun) for parallelism")
    data = DataSpec.of(spec, data_dir, resolution, skip_bad_images, cache_dir)
    encode_federated(data, budget, output, options, subtasks=subtasks, split=split or "contiguous",
                     subtask=subtask, nproc=nproc, dataset=train)


@cli.command("merge")
@click.argument("parts", nargs=-1, required=True, metavar="PART...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The merged .d3 file to write.")
@click.option("--dataset", "spec", metavar="DATASET",
              help="The dataset the parts were encoded from (default: the one they record), for the soft labels.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with a builtin dataset's files.")
@click.option("--resolution", type=int, help="Resize images to N x N (as the parts were encoded).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Cache folder (default: the one the parts record, else $D3CODEC_CACHE or ~/.cache/d3codec).")
@_device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def merge_cmd(parts: tuple[str, ...], output: str, spec: Optional[str], data_dir: Optional[str],
              resolution: Optional[int], cache_dir: Optional[str], device: str, quiet: bool) -> None:
    """Merge the part files of `encode --subtasks K --subtask i` jobs into one .d3 file: all decoders,
    the class-to-decoder map, all priors, then soft labels from a teacher over all classes (trained
    on the full data if none is cached), mixed with each component's own class as the encode's
    --own-class-weight said (auto: only for a teacher that hardly knows them). Refuses parts that
    do not fit together, naming the part: other data, other format version, other run settings,
    overlapping or missing classes, or a part over its share of the budget."""
    from d3codec.distill.merge import DataSpec, merge_parts

    if not spec and (data_dir or resolution or cache_dir):
        raise ConfigError("--data-dir, --resolution and --cache-dir describe --dataset; give --dataset too")
    check_output_file(output, inputs=parts)
    data = DataSpec.of(spec, data_dir, resolution, False, cache_dir) if spec else None
    merge_parts(list(parts), output, data=data, device=device, quiet=quiet)


# ---- sample: look at a .d3 file as a picture (decode/grid) ----

@cli.command("sample")
@click.argument("file", metavar="FILE")
@click.option("-n", "num", type=click.IntRange(min=0), default=8, show_default=True,
              help="Random samples per class, after the mean image.")
@click.option("-o", "--output", required=True,
              help="Image file to write; its suffix names the format (.png, .jpg, .webp, .bmp, .tif).")
@click.option("--classes", "classes_spec", default=None,
              help="Class ids, e.g. 0,1,2 or 0-4 (default: the first 20 classes).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random samples.")
@click.option("--scale", type=click.IntRange(min=1), default=1, show_default=True,
              help="Magnify each image this many times (nearest neighbour).")
@_device_option
def sample_cmd(file: str, num: int, output: str, classes_spec: Optional[str], seed: int, scale: int,
               device: str) -> None:
    """Write a grid of FILE's images: one row per class, the mean image first, then N samples.
    The grid is at most 49 megapixels."""
    from d3codec.decode.grid import check_grid_size, image_format, sample_grid, save_image
    from d3codec.format.io import load

    check_output_file(output, inputs=[file], example="grid.png")
    image_format(output)
    d3 = load(file)
    classes = _parse_classes(classes_spec)
    check_grid_size(d3, num, classes, scale=scale)
    image = sample_grid(d3, n=num, classes=classes, seed=seed, device=device, scale=scale)
    save_image(image, output)
    click.echo(f"wrote {output} ({image.width}x{image.height} px)")


# ---- export: the file's images as a fixed set, for folder- and tensor-based evaluators (decode/export) ----

@cli.command("export")
@click.argument("file", metavar="FILE")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to create (it must not exist, or be empty).")
@click.option("--per-class", type=click.IntRange(min=1), required=True,
              help="Images per class: the mean images of the class's components first, then seeded draws.")
@click.option("--format", "fmt", type=click.Choice(["imagefolder", "pt"]), default="imagefolder", show_default=True,
              help="imagefolder: OUTPUT/<class>/<j>.png (uint8) and labels.pt; pt: OUTPUT/images.pt (float32 "
                   "pixels in [0, 1], labels, class names, mean and std).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images decoded at a time (bounds memory).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT when an earlier `d3codec export` wrote it.")
@_device_option
def export_cmd(file: str, output: str, per_class: int, fmt: str, seed: int, batch_size: int, overwrite: bool,
               device: str) -> None:
    """Write FILE's images as a fixed labelled set: --per-class images per class (the mean images
    first, then seeded random draws) with their labels (soft probabilities when the file has them),
    for evaluators and training code that take an ImageFolder or an image tensor."""
    from d3codec.decode.export import check_destination, export
    from d3codec.format.io import load

    check_destination(output, overwrite, (file,))
    d3 = load(file)
    result = export(d3, output, per_class, fmt, seed=seed, device=device, batch_size=batch_size,
                    overwrite=overwrite, source=file)
    where = "labels.pt" if fmt == "imagefolder" else "images.pt"
    click.echo(f"wrote {result.images:,} images ({result.per_class} per class, the first "
               f"{result.mean_images_per_class} the mean images; {result.labels} labels in {where}) of "
               f"{result.num_classes} classes to {output} on {result.device}")
