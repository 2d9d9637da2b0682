"""What every command shares: options generated from the typed configs (config.py, so each
option's default, range and help are written once), one-line errors and clean interrupts."""

from __future__ import annotations

import dataclasses
import math
import os

import click

from .config import BENCH_DEFAULTS, BENCH_QUICK, flag
from .files import unwritable
from .tasks import TASKS, task_names


TASK_CHOICE = click.Choice(task_names())
BUILT_IN_TASK = click.Choice(list(TASKS))  # the tasks with a built-in class list (synthetic data, demo)
BENCH_TEXT = {k: ",".join(map(str, BENCH_DEFAULTS[k])) for k in ("threads", "batches")}  # as the options take them
QUICK_TEXT = f"batch {BENCH_QUICK['batches'][0]}, {BENCH_QUICK['warmup']} warm-up and {BENCH_QUICK['runs']} timed runs"


class OutDir(click.Path):
    """An --out folder, new or existing, checked before any work starts: a command that would
    fail to write its results after minutes of work fails at once instead."""

    name = "directory"

    def __init__(self):
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if why := unwritable(value):
            self.fail(why, param, ctx)
        return value


OUT_DIR = OutDir()


class Finite(click.FloatRange):
    """A float option, in its range if it has one, that refuses nan and inf (click's FloatRange
    lets nan through every bound: a gate of nan passes everything)."""

    def convert(self, value, param, ctx):
        out = super().convert(value, param, ctx)
        if not math.isfinite(out):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return out

    def _describe_range(self) -> str:  # unbounded: no "x<=None" in --help
        return super()._describe_range() if self.min is not None or self.max is not None else ""


def _click_type(f):
    m = f.metadata
    if "choices" in m:
        return click.Choice(list(m["choices"]))
    if m.get("path") == "file":
        return click.Path(exists=True, dir_okay=False)
    if m.get("path") == "dir":
        return click.Path(file_okay=False)
    base = m.get("type") or (type(f.default) if f.default is not None else str)
    if base is float:
        return Finite(m.get("minimum"), m.get("maximum"), min_open=m.get("min_open", False),
                      max_open=m.get("max_open", False))
    if base is int and ("minimum" in m or "maximum" in m):
        return click.IntRange(m.get("minimum"), m.get("maximum"))
    return base


def options_from(cls):
    """click options for every field of a typed config that has help text (config.py), so
    defaults and help are written once."""
    def deco(fn):
        for f in reversed(dataclasses.fields(cls)):
            m = f.metadata
            if "help" not in m:
                continue
            name = flag(f)
            if m.get("negate"):
                fn = click.option("--no-" + f.name.replace("_", "-"), f.name, is_flag=True, help=m["help"])(fn)
            elif isinstance(f.default, bool):
                fn = click.option(name, f.name, is_flag=True, help=m["help"])(fn)
            elif m.get("multiple"):
                fn = click.option(name, f.name, multiple=True, default=f.default, type=_click_type(f),
                                  show_default=bool(f.default), help=m["help"])(fn)
            else:
                fn = click.option(name, f.name, default=f.default, type=_click_type(f), metavar=m.get("metavar"),
                                  show_default=f.default is not None, help=m["help"])(fn)
        return fn
    return deco


def config_from(cls, values: dict, **fixed):
    """The typed config from the options' values (negated switches and unit scales undone)."""
    kw = dict(fixed)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name not in values:
            continue
        v = values[f.name]
        if f.metadata.get("negate"):
            v = not v
        if f.metadata.get("scale") and v is not None:
            v = v * f.metadata["scale"]
        kw[f.name] = v
    from .errors import MriEdgeError  # noqa: PLC0415

    try:
        return cls(**kw)
    except MriEdgeError as e:  # options that contradict each other: a usage error, before any work
        raise click.UsageError(str(e)) from None


class Interrupted(click.ClickException):
    exit_code = 130


signalled = False  # a Ctrl-C or SIGTERM came during this command (run_guarded)


def terminate(signum, frame):
    # SIGTERM (kill, docker stop, a job supervisor) takes the same way out as Ctrl-C, so every
    # command stops its child processes and leaves its folders consistent.
    global signalled
    signalled = True
    raise KeyboardInterrupt


def handle_interrupts() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt and are remembered (`terminate`); a Ctrl-C
    that the shell ignores (a background job) stays ignored."""
    import signal  # noqa: PLC0415

    global signalled
    signalled = False
    signal.signal(signal.SIGTERM, terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, terminate)


def one_line_warnings() -> None:
    """A warning prints as one line, as an error does (Python's own format adds the file, the
    line number and the source line: `--verbose` keeps it)."""
    import warnings  # noqa: PLC0415

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


# Every command lands its results whole or not at all (atomic writes, signals held while a set of
# files changes together), so after an interrupt this is true of all of them.
INTERRUPTED = "interrupted: what it finished is kept, and nothing is left half-written"


def run_guarded(fn, *args, **kwargs):
    """Call fn, turning input errors (MriEdgeError) and unreadable or unwritable files (OSError)
    into a one-line message and exit 1."""
    from .errors import MriEdgeError  # noqa: PLC0415

    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise Interrupted(INTERRUPTED) from None
    except Exception as e:
        # after a Ctrl-C or SIGTERM, whatever failed failed because of it: a library may catch the
        # KeyboardInterrupt and raise its own error (TensorFlow's RuntimeError), a pipe may close
        if signalled:
            raise Interrupted(INTERRUPTED) from None
        if isinstance(e, MriEdgeError):
            raise click.ClickException(str(e)) from None
        if isinstance(e, ModuleNotFoundError):  # a package the step needs, missing where only the runtime is installed
            from .errors import MissingPackageError, installed  # noqa: PLC0415

            top = (e.name or "").split(".")[0]
            # our own module, or a part of an installed package (a version mismatch): a bug to see whole
            if top and top != "mri_edge" and not installed(top):
                raise click.ClickException(str(MissingPackageError([top]))) from None
        elif isinstance(e, OSError) and not isinstance(e, BrokenPipeError):  # stdout's reader stopped: click's to end
            # a file or folder that cannot be read or written: name it, no traceback
            where = f"{e.filename2 or e.filename}: " if e.filename else ""  # a rename names its target second
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        raise


def echo(msg: str) -> None:
    from . import quiet  # noqa: PLC0415

    quiet.write_uncaptured(msg, lambda: click.echo(msg, err=True))  # past a converter's capture of fd 2


# The most threads or images in a batch an option takes: far above any machine's cores, far below
# what exhausts one (a thread count in the tens of thousands took the whole machine's processes).
MAX_COUNT = 1024


def int_list(ctx, param, value):
    try:
        out = tuple(int(v) for v in str(value).split(","))
    except ValueError:
        raise click.BadParameter("expected a comma-separated list of integers, e.g. 1,2") from None
    if not 1 <= min(out) <= max(out) <= MAX_COUNT:
        raise click.BadParameter(f"values must be between 1 and {MAX_COUNT}")
    return out


VERBOSE_HELP = "Show TensorFlow, converter and runtime log lines (hidden by default)."
THREADS = click.option("--threads", type=click.IntRange(1, MAX_COUNT), default=None,
                       help="CPU threads of each model's runtime (.keras: Keras' own) [default: every core this "
                            "process may use].")


def _verbose(ctx, param, value):
    if value:
        from .quiet import set_verbose  # noqa: PLC0415

        set_verbose(True)  # after the group's own --verbose (or its absence) was applied


KERAS_BACKENDS = ("tensorflow", "torch", "jax", "numpy", "openvino")


def check_environment() -> None:
    """The environment variables a command reads, refused in one line before it starts."""
    if os.environ.get("MRI_EDGE_MAX_PIXELS"):
        from .errors import MriEdgeError  # noqa: PLC0415

        try:
            from .preprocess import max_pixels  # noqa: PLC0415 (numpy: only when the variable is set)

            max_pixels()
        except MriEdgeError as e:
            raise click.ClickException(str(e)) from None
    backend = os.environ.get("KERAS_BACKEND")
    if backend and backend not in KERAS_BACKENDS:
        raise click.ClickException(f"KERAS_BACKEND={backend}: Keras has no such backend ({', '.join(KERAS_BACKENDS)})")


class OneLineUsageError(click.UsageError):
    """A usage error in one line with where to look: click's own takes four (usage, hint, blank, error)."""

    def show(self, file=None):
        text = " ".join(self.format_message().split())  # one line: click lists choices on lines of their own
        text += "" if text.endswith((".", "?", "!", ".)", "?)", "!)")) else "."
        hint = f" See '{self.ctx.command_path} --help'." if self.ctx is not None else ""
        click.echo(f"Error: {text}{hint}", file=file, err=file is None)


NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2 (8.1 exits with the help)


def one_line(e: click.UsageError) -> click.UsageError:
    """The same error, shown in one line (a group called bare still shows its help)."""
    if isinstance(e, OneLineUsageError) or isinstance(e, NO_ARGS_IS_HELP):
        return e
    return OneLineUsageError(e.format_message(), e.ctx)


class Main(click.Group):
    """A group whose commands and groups take --verbose too, after their name, where users put it
    (`mri-edge predict --verbose ...`, `mri-edge data --verbose audit ...`), and whose usage errors are one line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:  # the group's own options
            raise one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a command's (or a subgroup's) arguments and options, and its checks
            raise one_line(e) from None

    def resolve_command(self, ctx, args):
        if not {"-h", "--help"} & set(args):  # a command's help is shown whatever the environment
            check_environment()
        return super().resolve_command(ctx, args)

    def add_command(self, cmd, name=None):
        if all(p.name != "verbose" for p in cmd.params):
            cmd.params.append(click.Option(["--verbose"], is_flag=True, expose_value=False, callback=_verbose,
                                           help=VERBOSE_HELP))
        super().add_command(cmd, name)
