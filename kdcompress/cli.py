"""The ``kdc`` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from ._version import __version__
from .errors import KdcError, UsageError
from .run import layout


def _reflowed(text: Optional[str]) -> Optional[str]:
    """Help text with each paragraph on one line: the terminal wraps it, never mid-sentence at a docstring's break."""
    if not text:
        return text
    import inspect

    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def _plain_metavars(params) -> None:
    """One metavar style in help: none for a flag (not ``<bool>``), an upper-case word for a value (not ``<int>``)."""
    for param in params:
        if param.param_type_name == "argument":  # its name says it: RECIPE, not RECIPE <path>
            param.display_type_rich = _no_type
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        else:
            param.metavar = (param.name or "value").strip("_").upper().replace("_", "-")


def _no_type(ctx=None) -> None:
    return None


def _usage_hint(ctx, exc) -> str:
    """What to type instead of an option kdc does not have: ``--epochs`` is ``--set teacher.epochs=N``."""
    from .recipe import key_sections

    name = getattr(exc, "option_name", None) or ""
    key = name.lstrip("-").replace("-", "_")
    sections = key_sections(key) if name.startswith("--") and key else []
    if not sections:
        return ""
    command = ctx.command_path.split()[-1] if ctx is not None else ""
    sections.sort(key=lambda section: section not in command)  # kdc distill --epochs: distill.epochs first
    others = f" (or {', '.join(f'{s}.{key}' for s in sections[1:])})" if len(sections) > 1 else ""
    return f"; recipe values are set with --set: --set {sections[0]}.{key}=N{others}".replace(
        "=N", "=VALUE", key != "epochs"
    )


class _KdcCommandMixin:
    """Every kdc command and group: help without hard line breaks or ``<bool>``; usage errors as kdc errors."""

    def __init__(self, *args, **kwargs):
        for name in ("help", "short_help", "epilog"):
            if kwargs.get(name):
                kwargs[name] = _reflowed(kwargs[name])
        super().__init__(*args, **kwargs)
        _plain_metavars(self.params)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_metavars([option])
            option.help = "show this help and exit"  # lower case, as every other option's
        return option

    def collect_usage_pieces(self, ctx):
        import re

        # NAME for a required argument, [NAME] for an optional one, as the examples write them (typer: {NAME})
        return [re.sub(r"\{([^{}]+)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]

    def parse_args(self, ctx, args):
        with _usage_errors(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with _usage_errors(ctx):
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors(ctx):
    """A command line that names no option or value kdc has: one ``error:`` line, the usage, exit 2.

    Every usage error of the parser (an unknown option, a missing argument, a bad value) comes through here,
    printed like kdc's own errors instead of typer's boxed panel.
    """
    try:
        yield
    except typer.Exit:
        raise
    except typer.TyperException as exc:
        if not hasattr(exc, "format_message") or type(exc).__name__ == "NoArgsIsHelpError":
            raise
        where = getattr(exc, "ctx", None) or ctx
        hint = _usage_hint(where, exc)
        message = f"No such option: {exc.option_name}" if hint else exc.format_message()  # not "possible: --nproc"
        message = message[:1].lower() + message[1:]
        err.print(f"[bold red]error:[/] {escape(message + hint)}", soft_wrap=True)
        err.print(
            f"usage: {escape(where.get_usage().removeprefix('Usage: '))}; `{where.command_path} --help` says more"
        )
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None


class KdcCommand(_KdcCommandMixin, TyperCommand):
    """A kdc subcommand (see :class:`_KdcCommandMixin`)."""


class KdcGroup(_KdcCommandMixin, TyperGroup):
    """The kdc command group (see :class:`_KdcCommandMixin`)."""


class KdcTyper(typer.Typer):
    """typer.Typer whose commands and groups are :class:`KdcCommand` and :class:`KdcGroup`."""

    def __init__(self, **kwargs):
        kwargs.setdefault("cls", KdcGroup)
        super().__init__(**kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", KdcCommand)
        return super().command(*args, **kwargs)


app = KdcTyper(
    name="kdc",
    help=(
        "Turn a big model into a small one from one YAML recipe: train a teacher, distil it into a student, "
        "prune and retrain the student, and compare every stage.\n\n"
        "Examples: kdc run   (the built-in quickstart recipe, offline);   kdc recipes   (the shipped recipes);   "
        "kdc recipes copy fashion-mnist-mlp && kdc run fashion-mnist-mlp.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


class _NoTrailingSpaces:
    """stdout for a pipe or a file: each line as rich renders it, less the spaces it pads a line with."""

    def __init__(self):
        self.pending = ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            sys.stdout.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            sys.stdout.write(self.pending.rstrip(" "))
            self.pending = ""
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


PIPE_WIDTH = 100  # stdout that is not a terminal: no line longer (the report's tables are made to fit it)

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)
if not out.is_terminal:  # piped or captured: 100 columns, no trailing spaces
    out = Console(highlight=False, width=PIPE_WIDTH, file=_NoTrailingSpaces())


def _stdout() -> Console:
    """``out``, unless stdout is not a terminal and COLUMNS is set now: then a console that wide.

    COLUMNS is read at call time (``out`` reads it at import), so ``COLUMNS=120 kdc report`` is honoured
    when piped and under a test runner alike.
    """
    columns = os.environ.get("COLUMNS", "")
    if out.is_terminal or not columns.isdigit() or int(columns) <= 0:
        return out
    return Console(highlight=False, width=int(columns), file=_NoTrailingSpaces())


_state = {"debug": False}

RecipeArg = typer.Argument(
    None,
    metavar="RECIPE",
    help="recipe YAML file, or a run directory to go on with the settings it was made with; omit it for the "
    "built-in quickstart recipe",
    show_default=False,
)
SetOpt = typer.Option(
    None, "--set", "-s", metavar="KEY.PATH=VALUE", help="override a recipe value, e.g. --set distill.temperature=2"
)
ForceOpt = typer.Option(False, "--force", help="rerun stages even when their checkpoints are up to date")
RestartOpt = typer.Option(
    False, "--restart", help="start an interrupted stage over instead of resuming it from its last completed epoch"
)
QuietOpt = typer.Option(
    False,
    "--quiet",
    "-q",
    help="for scripts: print errors and the final summary only (no progress, epoch lines or per-stage messages)",
)
TrustOpt = typer.Option(
    False,
    "--trust-code",
    help="RECIPE is a run directory you trust: import the code its recipe.yaml names (your own models, datasets or "
    "losses); without it, kdc refuses to, since a run directory is data anyone who can write there may have changed",
)


def _chatter(quiet: bool) -> Console:
    """Where training's progress and per-stage messages go: stderr, or nowhere with --quiet (errors still print)."""
    return Console(stderr=True, quiet=True) if quiet else err


def _version(value: bool) -> None:
    if value:
        out.print(f"kdc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks for errors"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    _state["debug"] = debug


# What Ctrl-C leaves behind in the commands that train nothing (the others keep every completed epoch)
_INTERRUPTED = {
    "export": "every artifact finished so far is kept, each written whole with its manifest; rerun the same "
    "command to go on",
    "report": "no stage or artifact of the run was changed; rerun the same command to make the report",
}


def _friendly(func):
    """Turn KdcError into one clear message and an exit code; Ctrl-C into exit 130 with advice that fits the command."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KdcError as exc:
            if _state["debug"]:
                raise
            # escaped: a message that quotes `--set export.formats=[sparse]` must keep its brackets
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            if func.__name__ in _INTERRUPTED:
                err.print(f"[yellow]interrupted[/]: {_INTERRUPTED[func.__name__]}")
                raise typer.Exit(130) from None
            if kwargs.get("force"):  # --force drops the resume state, so the same command would start over
                advice = "rerun the command without --force to resume (--restart or --force starts the stage over)"
            else:
                advice = "rerun the same command to resume (--restart starts the stage over)"
            err.print(f"[yellow]interrupted[/]: every completed epoch is saved; {advice}")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: say so plainly, keep the traceback behind --debug
            if _state["debug"]:
                raise
            err.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\nThis is a kdc bug; rerun with "
                f"`kdc --debug ...` for the traceback and report it.",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _check_choices(option: str, values, choices) -> None:
    """UsageError ``--format: must be one of a, b, got 'x'`` for a value of ``option`` that is not a choice."""
    from .errors import did_you_mean

    for value in values or ():
        if value not in choices:
            raise UsageError(
                f"{option}: must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}"
            )


def _recipe_file(recipe: Optional[Path]) -> Optional[Path]:
    """The recipe file a command argument names: a YAML file, or a run directory's resolved recipe.

    A run directory (``runs/NAME``) holds ``recipe.yaml`` with every value the run was last made with,
    earlier ``--set`` overrides included, so a stage command can go on from it.
    """
    from .errors import Problem, RecipeError

    if recipe is None:
        return None
    if layout.is_run_dir(recipe):
        return layout.recipe_path(recipe)
    if not recipe.exists() and recipe.stem in shipped_recipes():
        raise RecipeError(
            str(recipe),
            [
                Problem(
                    "",
                    f"recipe file not found; '{recipe.stem}' is a recipe shipped with kdc: "
                    f"`kdc recipes copy {recipe.stem}` copies it here as {recipe.stem}.yaml",
                )
            ],
        )
    return recipe


def _load(recipe: Optional[Path], overrides: Optional[List[str]], trust_code: bool = False):
    """The recipe a command argument names (see :func:`_recipe_file`), checked, with ``overrides`` applied.

    A run directory's recipe.yaml is data: its folder never goes on the import path, and without
    ``trust_code`` a recipe.yaml naming code to import is refused before anything is imported.
    """
    from .recipe import CODE_KEYS, load_recipe
    from .run import FILE_KEYS, refuse_untrusted_code

    path = _recipe_file(recipe)
    where: list[str] = []
    if path is not None and recipe is not None and path.parent == recipe:
        # a run directory stays where it is, even moved or copied from where its recipe.yaml says runs go; named
        # as the user did (runs/NAME stays relative, in recipe.yaml, report.json and messages alike)
        resolved = recipe.resolve()
        parent = resolved.parent if recipe.is_absolute() else Path(os.path.relpath(resolved.parent))
        where = [f"run.out_dir={parent}", f"run.name={resolved.name}"]
    in_run_dir = path is not None and path.name == layout.RECIPE_FILE and layout.marker_path(path.parent).is_file()
    loaded = load_recipe(
        path, where + list(overrides or []), import_folder=not in_run_dir, import_code=trust_code or not in_run_dir
    )
    if in_run_dir and not trust_code:
        typed = {item.partition("=")[0].strip() for item in overrides or []}  # set on the command line: the user's
        refuse_untrusted_code(
            loaded, path, [key for key in CODE_KEYS if key not in typed], [key for key in FILE_KEYS if key not in typed]
        )
    return loaded


def _origin(recipe: Optional[Path], overrides: Optional[List[str]]):
    """The command line a recipe was loaded from (RECIPE and every --set), for the commands messages suggest."""
    from .run import Origin

    return Origin(str(recipe) if recipe else "", tuple(overrides or ()))


def _stage_command(
    stage: str, recipe, overrides, force, restart, quiet: bool = False, trust_code: bool = False
) -> None:
    from .run import checkpoint_path, run_stage

    loaded = _load(recipe, overrides, trust_code)
    metrics = run_stage(
        loaded, stage, force=force, restart=restart, console=_chatter(quiet), origin=_origin(recipe, overrides)
    )
    if quiet:  # the stage's own closing line went with the rest: the summary is this one
        err.print(
            f"{stage}: test accuracy {metrics['test_accuracy']:.4f}, {metrics['nonzero_params']:,} of "
            f"{metrics['params']:,} parameters non-zero ({checkpoint_path(loaded.run_dir, stage)})"
        )


def _add_stage_command(stage) -> None:
    """Register ``kdc <stage.command>`` from a stage's declaration (stages.STAGES).

    Every stage command takes RECIPE, --set, --force and --restart, plus the stage's declared shortcut
    options (``kdc prune --rate 0.05`` is ``--set prune.rate=0.05``).
    """
    import inspect

    def command(**kwargs):
        overrides = list(kwargs.pop("set_") or [])
        for option, key, _, kind in stage.options:
            if kwargs.get(option) is not None:  # checked with the recipe, so a bad value gets its message
                value = kwargs[option]
                overrides.append(f"{key}={value!r}" if kind is float else f"{key}={value}")
        _stage_command(
            stage.name,
            kwargs["recipe"],
            overrides,
            kwargs["force"],
            kwargs["restart"],
            kwargs["quiet"],
            kwargs["trust_code"],
        )

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("recipe", keyword, default=RecipeArg, annotation=Optional[Path])]
    params += [
        inspect.Parameter(
            option,
            keyword,
            annotation=Optional[kind],
            default=typer.Option(None, f"--{option}", help=f"{text} (sets {key})"),
        )
        for option, key, text, kind in stage.options
    ]
    params += [
        inspect.Parameter("set_", keyword, default=SetOpt, annotation=Optional[List[str]]),
        inspect.Parameter("force", keyword, default=ForceOpt, annotation=bool),
        inspect.Parameter("restart", keyword, default=RestartOpt, annotation=bool),
        inspect.Parameter("quiet", keyword, default=QuietOpt, annotation=bool),
        inspect.Parameter("trust_code", keyword, default=TrustOpt, annotation=bool),
    ]
    command.__signature__ = inspect.Signature(params)
    command.__name__ = stage.command.replace("-", "_")
    command.__doc__ = f"{stage.summary}\n\nExample: {stage.example}"
    app.command(stage.command)(_friendly(command))


def _add_stage_commands() -> None:
    from .run.stages import STAGES

    for stage in STAGES:
        _add_stage_command(stage)


_add_stage_commands()


@app.command()
@_friendly
def run(
    recipe: Optional[Path] = RecipeArg,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
    restart: bool = RestartOpt,
    nproc: int = typer.Option(
        1, "--nproc", min=1, metavar="N", help="train with N processes (torch.distributed: gloo on CPU, nccl on CUDA)"
    ),
    seeds: Optional[int] = typer.Option(
        None,
        "--seeds",
        min=1,
        metavar="N",
        show_default=False,
        help="run N seeds, run.seed to run.seed+N-1 (sets run.seeds): the teacher is trained once, every other "
        "stage per seed, in <run dir>/seeds/seed-S; the report gives mean ± std",
    ),
    quiet: bool = QuietOpt,
    trust_code: bool = TrustOpt,
):
    """Run every stage (skipping up-to-date ones), then write and print the report.

    Example: kdc run fashion-mnist-mlp.yaml   (from `kdc recipes copy fashion-mnist-mlp`); with 2 processes: kdc run
    fashion-mnist-mlp.yaml --nproc 2; three seeds, one teacher: kdc run fashion-mnist-mlp.yaml --seeds 3
    """
    from . import distributed
    from .run import lock_run_dir, run_pipeline, run_seeds, seed_list

    load = functools.partial(_load, trust_code=trust_code)
    loaded = load(recipe, set_)  # check the recipe before launching anything
    if seeds is not None:
        set_ = list(set_ or []) + [f"run.seeds=[{', '.join(map(str, seed_list(loaded.run.seed, seeds)))}]"]
        loaded = load(recipe, set_)
    if len(loaded.run.seeds) > 1:
        if nproc > 1 or distributed.launched_by_torchrun():
            raise UsageError(
                "--seeds (run.seeds) runs one process per seed for now; drop --nproc, or run each seed "
                "with --set run.seed=S --set teacher.seed=FIRST"
            )
        with lock_run_dir(loaded.run_dir):  # one writer from the first seed to the report
            first = run_seeds(
                recipe,
                list(set_ or []),
                list(loaded.run.seeds),
                force=force,
                restart=restart,
                console=_chatter(quiet),
                load=load,
            )
            _report(first.run_dir, recipe=first)
        return
    if nproc > 1 and not distributed.launched_by_torchrun():
        raise typer.Exit(_launch(nproc, recipe, set_, force, restart, quiet, trust_code))
    try:
        with lock_run_dir(loaded.run_dir):  # one writer from the first stage to the report
            run_pipeline(loaded, force=force, restart=restart, console=_chatter(quiet), origin=_origin(recipe, set_))
            if distributed.is_main():
                _report(loaded.run_dir, recipe=loaded)
    finally:
        distributed.shutdown()


def _launch(
    nproc: int, recipe, overrides, force: bool, restart: bool, quiet: bool = False, trust_code: bool = False
) -> int:
    """Start ``torchrun --standalone --nproc_per_node=N -m kdcompress run ...``; return its exit code."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "kdcompress",
    ]
    cmd += ["--debug"] if _state["debug"] else []
    cmd += ["run"] + ([str(recipe)] if recipe else [])
    for item in overrides or []:
        cmd += ["--set", item]
    cmd += ["--force"] if force else []
    cmd += ["--restart"] if restart else []
    cmd += ["--quiet"] if quiet else []
    cmd += ["--trust-code"] if trust_code else []
    _chatter(quiet).print(f"launching {nproc} processes: {' '.join(cmd[1:])}")
    return subprocess.call(cmd)


REPORT_FORMATS = ("table", "md", "json", "html", "all")


def _report(run_dir: Path, fmt: str = "table", open_: bool = False, recipe=None) -> None:
    """Write the run's report.json, report.md and report.html; show ``fmt`` on stdout (see `kdc report`).

    ``recipe``: the recipe the user gave for the run, whose models are built (else its recipe.yaml's built-in ones).
    """
    import json

    from .report import report_markdown, report_warnings, write_report

    report = write_report(run_dir, recipe=recipe)
    files = {kind: layout.report_path(run_dir, kind) for kind in layout.REPORT_KINDS}
    if fmt in ("table", "all"):
        _print_report_table(report, report_warnings(report, run_dir))  # warnings naming this run's real path
    elif fmt == "md":
        _stdout_text(report_markdown(report))
    elif fmt == "json":
        _stdout_text(json.dumps(report, indent=2) + "\n")
    elif fmt == "html":
        _stdout_text(files["html"].read_text(encoding="utf-8"))
    err.print(f"wrote {files['md']}, {files['json']} and {files['html']}")
    if open_:
        _open_in_browser(files["html"])


def _print_report_table(report: dict, warnings: list[str]) -> None:
    from rich.text import Text

    from .report import report_table

    console = _stdout()
    console.print(report_table(report))
    for warning in warnings:  # with the table, so they travel where it goes
        console.print(Text.assemble(("warning", "bold yellow"), ": ", warning))


def _stdout_text(text: str) -> None:
    """Plain text to stdout, exactly as written (no rich markup or wrapping): for pipes and files."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _open_in_browser(path: Path) -> None:
    """Open ``path`` in the user's browser when there is one; otherwise say so (the report is written anyway)."""
    import webbrowser

    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        err.print(f"no web browser found here (set $BROWSER to one); open {path} in a browser yourself")
        return
    if not browser.open(path.resolve().as_uri()):
        err.print(f"the browser did not open; open {path} in a browser yourself")


def _compare_reports(
    run_dirs: list[Path], out_dir: Path, fmt: str, open_: bool, recipes: Optional[list] = None
) -> None:
    """Write each run's report, then one comparison of them all into ``out_dir``: report.json, .md and .html.

    ``recipes``: per run, the recipe whose models are built (see :func:`_report`).
    """
    import json

    from .files import atomic_write_files
    from .report import write_report
    from .report.compare import build_comparison, comparison_markdown
    from .report.html import render_comparison_html

    reports = []
    for run_dir, recipe in zip(run_dirs, recipes or [None] * len(run_dirs)):
        report = write_report(run_dir, recipe=recipe)
        reports.append((report.get("run_name") or report.get("recipe") or run_dir.name, report))
    comparison = build_comparison(reports)
    texts = {
        "json": json.dumps(comparison, indent=2) + "\n",
        "md": comparison_markdown(comparison),
        "html": render_comparison_html(comparison),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_files({layout.report_path(out_dir, kind): text for kind, text in texts.items()})  # all three, or none
    if fmt in ("table", "all"):
        _stdout().print(_comparison_table(comparison))
    else:
        _stdout_text(texts[fmt])
    err.print(
        f"compared {len(run_dirs)} runs: wrote {layout.report_path(out_dir, 'md')}, "
        f"{layout.report_path(out_dir, 'json')} and {layout.report_path(out_dir, 'html')}"
    )
    if open_:
        _open_in_browser(layout.report_path(out_dir, "html"))


def _comparison_table(comparison: dict):
    """The comparison as a terminal table: one row per stage and per artifact of every run."""
    from rich.table import Table
    from rich.text import Text

    from .report.compare import LATENCY_BATCH, comparison_rows

    names = ", ".join(run["name"] for run in comparison["runs"])
    table = Table(title=f"kdc report: {names}", title_justify="left")
    for header in ("run", "stage / file", "model / format", "acc %", "bytes", "non-zero", f"ms @{LATENCY_BATCH}"):
        table.add_column(header, justify="left" if header in ("run", "stage / file", "model / format") else "right")
    for r in comparison_rows(comparison):
        if r["refused"]:
            table.add_row(r["run"], r["label"], r["detail"] or "", "refused", "", "", "")
            continue
        table.add_row(
            r["run"],
            r["label"] + (" (stale)" if r["stale"] else ""),
            Text(r["detail"] or ""),
            "" if r["accuracy"] is None else f"{r['accuracy'] * 100:.2f}",
            "" if r["bytes"] is None else f"{r['bytes']:,}",
            "" if r["nonzero_params"] is None else f"{r['nonzero_params']:,}",
            "" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}",
        )
    return table


@app.command()
@_friendly
def export(
    recipe: Optional[Path] = RecipeArg,
    format_: Optional[List[str]] = typer.Option(
        None,
        "--format",
        "-f",
        help="sparse, shared, int8 or onnx; repeat it for several (default: export.formats)",
        show_default=False,
    ),
    stage: Optional[str] = typer.Option(
        None, "--stage", help="the stage to export (sets export.stage; default pruned)"
    ),
    bits: Optional[int] = typer.Option(None, "--bits", help="shared: bits per weight index, 2 to 8 (sets export.bits)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="sparse: fp16 or fp32 non-zeros (sets export.dtype)"),
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="write artifacts again even when they are up to date"),
    quiet: bool = QuietOpt,
    trust_code: bool = TrustOpt,
):
    """Write a stage's model as files to ship (<run dir>/export/), load each back and measure it; then report.

    Formats: sparse (non-zeros only), shared (k-means weight sharing, --bits), int8 and onnx (need
    `pip install 'kdcompress\\[onnx]'`). Example: kdc export runs/quickstart --format sparse --format shared --bits 4
    """
    from .export import FORMATS
    from .run import EXPORT_WAIT_ADVICE, export_stage, run_dir_lock

    _check_choices("--format", format_, FORMATS)
    overrides = list(set_ or [])
    if format_:
        overrides.append(f"export.formats=[{','.join(format_)}]")
    for key, value in (("stage", stage), ("bits", bits), ("dtype", dtype)):
        if value is not None:
            overrides.append(f"export.{key}={value}")
    loaded = _load(recipe, overrides, trust_code)
    with run_dir_lock(loaded.run_dir, advice=EXPORT_WAIT_ADVICE, create=False):  # through the report it writes
        export_stage(loaded, force=force, console=_chatter(quiet), origin=_origin(recipe, overrides))
        _report(loaded.run_dir, recipe=loaded)


def _ratio_list(text: str) -> str:
    """``--ratios 0.1,0.3`` as the recipe value ``[0.1, 0.3]``; UsageError when it is not a list of numbers."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"--ratios: give numbers in (0, 1) separated by commas, e.g. 0.1,0.3,0.5; got {text!r}")
    return f"prune.sensitivity_ratios=[{', '.join(repr(v) for v in values)}]"


def _sensitivity_table(result):
    """The measured drops as a terminal table: one row per group, one column per ratio."""
    from rich.table import Table

    table = Table(
        title=f"kdc sensitivity: accuracy drop in points, each group pruned alone ({result.method}); baseline "
        f"{result.baseline_accuracy * 100:.2f}% ± {result.baseline_se * 100:.2f} on {result.samples:,} {result.split} "
        f"images",
        title_justify="left",
    )
    table.add_column("group", no_wrap=True)
    table.add_column(result.unit, justify="right")
    for ratio in result.ratios:
        table.add_column(f"{ratio:g}", justify="right")
    for group in result.groups:
        table.add_row(escape(group.name), f"{group.size:,}", *(f"{d:+.1f}" for d in group.drop))
    return table


@app.command()
@_friendly
def sensitivity(
    recipe: Optional[Path] = RecipeArg,
    ratios: Optional[str] = typer.Option(
        None,
        "--ratios",
        metavar="R1,R2,...",
        help="shares of each group pruned alone, e.g. 0.1,0.3,0.5 (sets prune.sensitivity_ratios)",
        show_default=False,
    ),
    samples: Optional[int] = typer.Option(
        None, "--samples", metavar="N", help="images each ratio is scored on (sets prune.sensitivity_samples)"
    ),
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="measure again even when sensitivity.json is up to date"),
    quiet: bool = QuietOpt,
    trust_code: bool = TrustOpt,
):
    """Prune each prunable group of the distilled student alone at a grid of ratios and measure the accuracy
    drop on the validation split (never the test split; without data.val_split, a fixed subset of the training
    images); writes <run dir>/sensitivity.json, which `kdc report` charts.

    Needs a finished distilled stage (kdc distill). Example: kdc sensitivity runs/fashion-mnist-cnn --ratios
    0.25,0.5,0.75 --samples 1000
    """
    from .run import run_sensitivity

    overrides = list(set_ or [])
    if ratios is not None:
        overrides.append(_ratio_list(ratios))
    if samples is not None:
        overrides.append(f"prune.sensitivity_samples={samples}")
    loaded = _load(recipe, overrides, trust_code)
    result, path, reused = run_sensitivity(
        loaded, force=force, console=_chatter(quiet), origin=_origin(recipe, overrides)
    )
    _stdout().print(_sensitivity_table(result))
    if result.note and not quiet:
        err.print(f"note: {result.note}")
    done = f"reused {path} (measured earlier in" if reused else f"wrote {path} (measured in"
    err.print(f"{done} {result.seconds:.1f} s); `kdc report {loaded.run_dir}` charts it")


@app.command()
@_friendly
def sweep(
    recipe: Optional[Path] = RecipeArg,
    grid: List[str] = typer.Option(
        ...,
        "--grid",
        "-g",
        help="KEY.PATH=V1,V2,...: values to try; repeat for more keys (every combination runs)",
        show_default=False,
    ),
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="retrain every stage of every point, shared ones included"),
    seeds: Optional[int] = typer.Option(
        None,
        "--seeds",
        min=1,
        metavar="N",
        show_default=False,
        help="run every point with N seeds, run.seed to run.seed+N-1 (as kdc run --seeds): the table gives means, "
        "and the distilled - student difference with its standard error",
    ),
    quiet: bool = QuietOpt,
    trust_code: bool = TrustOpt,
):
    """Run the recipe at every point of a grid, training the stages points share once; rank the points.

    Each point is a run directory <run dir>/sweep/<point>/; the ranked table goes to <run dir>/sweep/sweep.md and
    sweep.json. Run the same command again to go on after an interruption. Example: kdc sweep my-recipe.yaml
    --grid distill.temperature=1,2,4,8 --grid distill.alpha=0.5,0.9; three seeds per point: add --seeds 3
    """
    from rich.table import Table

    from .run import run_sweep, seed_list

    load = functools.partial(_load, trust_code=trust_code)
    set_ = list(set_ or [])
    if seeds is not None:
        set_.append(f"run.seeds=[{', '.join(map(str, seed_list(load(recipe, set_).run.seed, seeds)))}]")
    rows = run_sweep(recipe, grid, set_, force=force, console=_chatter(quiet), load=load)
    table = Table(title="kdc sweep: best distilled student first", title_justify="left")
    keys = [item.partition("=")[0].strip() for item in grid]
    for header in ["#", *keys, "student %", "distilled %", "distilled\n- student", "pruned %"]:
        table.add_column(header, justify="right", no_wrap=True)
    for rank, r in enumerate(rows, 1):
        diff = r.get("distilled_minus_student")
        table.add_row(
            str(rank),
            *(r["settings"].get(k, "") for k in keys),
            *("" if r.get(s) is None else f"{r[s] * 100:.2f}" for s in ("student", "distilled")),
            ""
            if diff is None
            else f"{diff * 100:+.2f}"
            + (
                "" if r.get("distilled_minus_student_se") is None else f" ± {r['distilled_minus_student_se'] * 100:.2f}"
            ),
            "" if r.get("pruned") is None else f"{r['pruned'] * 100:.2f}",
        )
    _stdout().print(table)
    if rows:
        err.print(
            f"wrote {Path(rows[0]['run_dir']).parent / layout.SWEEP_TABLE} and {layout.SWEEP_DATA} (one run directory "
            f"per point in {Path(rows[0]['run_dir']).parent}; `kdc report` works on each)"
        )


@app.command()
@_friendly
def frontier(
    recipe: Optional[Path] = RecipeArg,
    budget: Optional[str] = typer.Option(
        None,
        "--budget",
        "-b",
        metavar="KIND=V1,V2,...",
        help="prune to each budget: prune.budget.KIND at each value, KIND one of macs, params, bytes, latency_ms "
        "or latency (at most 1: a fraction of the distilled student's), e.g. macs=0.5,0.25,0.15",
        show_default=False,
    ),
    grid: Optional[List[str]] = typer.Option(
        None,
        "--grid",
        "-g",
        help="KEY.PATH=V1,V2,...: another key to sweep, as kdc sweep (e.g. prune.target_sparsity=0.3,0.5,0.7)",
        show_default=False,
    ),
    format_: Optional[str] = typer.Option(
        None,
        "--format",
        "-f",
        help="the exported format whose file is measured (default onnx, or the first of export.formats without it)",
        show_default=False,
    ),
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="retrain and export every point again, shared stages included"),
    quiet: bool = QuietOpt,
    trust_code: bool = TrustOpt,
):
    """Sweep pruning budgets, export every point and chart the frontier: accuracy against latency and bytes.

    Runs the sweep (points in <run dir>/sweep/<point>/, stages they share trained once), exports each point's
    pruned model and the distilled student (export.formats, or onnx), reports on each, and writes
    <run dir>/sweep/frontier.html and frontier.json with the non-dominated points marked. Run it again to go on
    after an interruption. Example: kdc frontier my-recipe.yaml --budget macs=0.5,0.25,0.15
    """
    from .report.frontier import write_frontier
    from .run import budget_grid, run_frontier

    items = ([budget_grid(budget)] if budget else []) + list(grid or [])
    if not items:
        raise UsageError(
            "kdc frontier needs the budgets to sweep: --budget macs=0.5,0.25,0.15 (or --grid KEY=V1,V2,... for "
            "another key)"
        )
    load = functools.partial(_load, trust_code=trust_code)
    points, fmt = run_frontier(
        recipe, items, list(set_ or []), fmt=format_, force=force, console=_chatter(quiet), load=load
    )
    sweep_dir = layout.sweep_dir(load(recipe, list(set_ or [])).run_dir)
    result = write_frontier(sweep_dir, points, fmt)
    _stdout().print(_frontier_table(result))
    err.print(
        f"wrote {sweep_dir / layout.FRONTIER_PAGE} and {layout.FRONTIER_DATA} (each point's run directory can be "
        "exported in another format: kdc export RUN_DIR --format int8)"
    )


def _frontier_table(result: dict):
    """The frontier as a terminal table: one row per model, the non-dominated ones marked."""
    from rich.table import Table

    table = Table(title=f"kdc frontier: {result['format']} files", title_justify="left")
    batch = result.get("latency_batch")
    for header in ("budget", "frontier", "acc %", f"ms @{batch}" if batch else "ms", "bytes", "run directory"):
        left = header in ("budget", "frontier", "run directory")
        table.add_column(header, justify="left" if left else "right", overflow="fold" if left else "ellipsis")
    for p in result["points"]:
        marks = ", ".join(axis for axis, on in (p.get("on_frontier") or {}).items() if on)
        table.add_row(
            p["label"],
            marks or "-",
            "" if p.get("accuracy") is None else f"{p['accuracy'] * 100:.2f}",
            "" if p.get("latency_ms") is None else f"{p['latency_ms']:.3f}",
            "" if p.get("bytes") is None else f"{p['bytes']:,}",
            p["run_dir"],
        )
    return table


@app.command()
@_friendly
def report(
    run_dirs: Optional[List[Path]] = typer.Argument(
        None,
        metavar="RUN_DIR",
        help="run directory (runs/<run.name>; run.name defaults to the recipe file's name without .yaml); omit it "
        "for the quickstart's; several, with --out, to compare them",
        show_default=False,
    ),
    out_dir: Optional[Path] = typer.Option(
        None,
        "--out",
        metavar="DIR",
        help="compare the runs into this folder: report.html, report.md and report.json",
        show_default=False,
    ),
    format_: str = typer.Option(
        "table",
        "--format",
        help="what to print: table, md, json, html, or all (the table; every file is written whichever you choose)",
    ),
    open_: bool = typer.Option(False, "--open", help="open report.html in a web browser when there is one"),
    trust_code: bool = typer.Option(
        False,
        "--trust-code",
        help="build the models of your own code that each run's recipe.yaml names (only if you trust the run "
        "directory: it is data anyone who can write there may have changed); built-in models need no trust",
    ),
):
    """Compare every stage of a run: accuracy, parameters, non-zeros, sparsity, bytes, MACs, latency at batch 1
    and 64; flags a stage whose checkpoint is stale against the run's recipe.yaml. Writes report.json, report.md
    and report.html (charts) into the run directory.

    Examples: kdc report runs/quickstart;  kdc report runs/quickstart --format md > report.md;  two runs side by
    side: kdc report runs/quickstart runs/t2 --out cmp
    """
    _check_choices("--format", [format_], REPORT_FORMATS)
    run_dirs = list(run_dirs or []) or [_load(None, None).run_dir]
    for run_dir in run_dirs:  # every one checked before any report is written
        if not Path(run_dir).is_dir():
            raise UsageError(
                f"run directory not found: {run_dir}; run `kdc run RECIPE` first (it writes <run.out_dir>/"
                f"<run.name>, by default runs/ and the recipe file's name without .yaml)"
            )
    if len(run_dirs) > 1 and out_dir is None:
        raise UsageError(
            f"{len(run_dirs)} run directories are compared into one folder: add --out DIR (e.g. "
            f"kdc report {' '.join(str(d) for d in run_dirs)} --out comparison)"
        )
    if out_dir is not None:
        if any(Path(out_dir).resolve() == Path(d).resolve() for d in run_dirs):
            raise UsageError(
                f"--out {out_dir} is one of the run directories; its report would be overwritten: choose another folder"
            )
    # the recipe.yaml of a run directory is read as data; with --trust-code, as the user's own recipe
    recipes = [_load(Path(d), None, trust_code=True) if trust_code else None for d in run_dirs]
    if out_dir is not None:
        _compare_reports([Path(d) for d in run_dirs], Path(out_dir), format_, open_, recipes)
        return
    _report(Path(run_dirs[0]), format_, open_, recipe=recipes[0])


@app.command()
@_friendly
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML file to check"),
    set_: Optional[List[str]] = SetOpt,
    trust_code: bool = TrustOpt,
):
    """Check a recipe without running it: keys, types, ranges, model and dataset names.

    Example: kdc validate my-recipe.yaml
    """
    from .errors import KdcError
    from .run import check_recipe
    from .train import resolve_device

    loaded = _load(recipe, set_, trust_code)
    summary = check_recipe(loaded)
    out.print(f"[green]ok[/]: {recipe} is a valid recipe")
    for line in summary:
        out.print(f"  {line}")
    try:  # a recipe may be meant for another machine: say so, but it is still valid
        resolve_device(loaded.run.device)
    except KdcError as exc:
        out.print(f"[yellow]warning[/]: on this machine, {exc}")


recipes_app = KdcTyper(
    help="The recipes shipped with kdc: list them, or copy one to edit.\n\nExample: kdc recipes copy quickstart my-recipe.yaml",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(recipes_app, name="recipes")


def shipped_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes shipped inside the package."""
    from .recipe import builtin_recipe_path

    folder = builtin_recipe_path().parent
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _summary(path: Path) -> str:
    """The first line of a shipped recipe's description: the comment block after its command line."""
    lines = [line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()]
    text = []
    for line in lines[1:]:
        if not line:
            if text:
                break
            continue
        text.append(line)
    summary = " ".join(text)
    return summary.split(". ")[0].rstrip(".") if summary else ""


@recipes_app.callback()
@_friendly
def recipes(ctx: typer.Context):
    """List the shipped recipes (copy one with `kdc recipes copy NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    table = Table(title="recipes shipped with kdc", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("what it runs")
    for name, path in shipped_recipes().items():
        table.add_row(name, _summary(path))
    out.print(table)
    out.print(
        "copy one to edit it: kdc recipes copy NAME [DEST]; run it: kdc run NAME.yaml (quickstart: plain `kdc run`)"
    )


@recipes_app.command("copy")
@_friendly
def recipes_copy(
    name: str = typer.Argument(..., help="a shipped recipe's name (see `kdc recipes`)"),
    dest: Optional[Path] = typer.Argument(
        None, help="file or folder to copy it to; default ./NAME.yaml", show_default=False
    ),
    force: bool = typer.Option(False, "--force", help="overwrite DEST if it exists"),
):
    """Copy a shipped recipe to a file you can edit.

    Example: kdc recipes copy quickstart my-recipe.yaml
    """
    import difflib

    from .files import atomic_write_text

    found = shipped_recipes()
    if name.endswith(".yaml"):
        name = name[: -len(".yaml")]
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UsageError(f"no shipped recipe named '{name}'; {hint}the shipped recipes are: {', '.join(found)}")
    target = Path(f"{name}.yaml") if dest is None else dest
    if target.is_dir():
        target = target / f"{name}.yaml"
    if target.exists() and not force:
        raise UsageError(f"{target} exists; choose another DEST, or add --force to overwrite it")
    atomic_write_text(target, found[name].read_text(encoding="utf-8"))
    err.print(f"copied the '{name}' recipe to {target}; run it with `kdc run {target}`")


TRAIN_SPINCOUNT = "10000"  # libgomp's GOMP_SPINCOUNT for the kdc process: see entry()


def entry() -> None:
    """Console-script entry point (``kdc`` and ``python -m kdcompress``)."""
    # Training small models runs many short parallel regions: threads made to sleep at once (PASSIVE) pay a
    # wake-up on each (an MLP's epoch took 0.92 s instead of 0.38 s), while libgomp's default spin (300,000
    # turns) holds a core another process needs (4 to 14 s an epoch with one core busy). Spinning 10,000
    # turns keeps the quiet speed (0.38 s) and gives back most of the busy one (2.0 s; PASSIVE 0.8 s):
    # scripts/bench_train_policy.py. A wait policy or spin count you set is left alone. Latency, which needs
    # sleeping threads on a busy machine, is timed in its own process (kdcompress.timing).
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", TRAIN_SPINCOUNT)
    app(prog_name="kdc")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
