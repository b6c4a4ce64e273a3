"""What a user watches: this package's lines, one progress bar per long step and errors on the
terminal; Ray's own output in its session log folder (`bahe -v`: Ray's defaults, all on the terminal).

The terminal shows this package's own lines (stage starts and ends, epochs, the summary),
warnings of other libraries, Ray Data's progress bar on a terminal, and errors. Ray's own
INFO/WARNING output (the driver's `ray.*` loggers, the workers', actors', raylet's and
autoscaler's lines Ray forwards to the driver, Serve's components, Python warnings) stays in
Ray's session log folder: Ray's own files there, plus `bahe-driver-<pid>.log` with everything
this process logged. `runtime.init_ray` calls `before_ray_init` and `after_ray_init`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

_verbose = False
_ray_joined = False

# A line of a worker's forwarded output that starts an error report (Python logging's levels, a
# traceback, an exception, a C++ fatal, raylet's notes on killed workers and memory); that line
# and the rest of its batch (the traceback) reach the terminal whichever process wrote it. Ray's
# C++ ERROR/WARNING/INFO lines (`[date E pid tid] file.cc:...`) are its own bookkeeping (e.g. "Failed
# to kill actor ... Socket closed" at a normal shutdown): they stay in the log files.
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|Traceback \(most recent call last\)|\b\w+(Error|Exception): "
                         r"|\bkilled\b|\b(low on|out of) memory\b", re.IGNORECASE)
_CPP_LINE = re.compile(r"^\[\d{4}-[^\]]* ([A-Z]) \d+ \d+\]")
# From raylet, GCS, autoscaler: killed workers, memory, and the autoscaler's "Error: ..." events
# (e.g. a resource request no node can fulfil: why a step would wait forever).
_PUSHED_WARNING = re.compile(r"\s*warning\b", re.IGNORECASE)
_RETRY_NOTE = re.compile(r"will be retried")  # e.g. Serve's controller at shutdown, "killed by `ray.kill`"
_SYSTEM_ALERT = re.compile(r"\bkilled\b|\b(low on|out of) memory\b|^Error:", re.IGNORECASE)


def _starts_error_report(line: str, system_process: bool) -> bool:
    cpp = _CPP_LINE.match(line)
    if cpp:
        return cpp.group(1) == "F"
    return bool((_SYSTEM_ALERT if system_process else _ERROR_LINE).search(line))


# The processes whose whole output is this package's: the Ray Train workers running the train loop.
_OUR_ACTORS = ("RayTrainWorker",)
# Ray Train's own INFO lines in those workers (its console level is RunConfig(logging_config=...)'s,
# INFO unless the trainer sets it): kept off the terminal here too; Train's files keep them.
_RAY_TRAIN_WORKER_NOTE = re.compile(r"^(Setting up process group for|Moving model to device|Wrapping provided model"
                                    r"|Checkpoint successfully created at|Reporting training result \d+)")
# Ray's best-effort background helpers, all of whose output (errors too) stays in the log files:
# Train's placement group cleaner polls the State API, which needs the dashboard (off here), so it
# warns once a second; with two local Ray instances on the machine its thread dies with a traceback.
# Neither touches the run: a failure that matters reaches the driver as Ray Train's own error.
_RAY_HELPERS = ("PlacementGroupCleaner",)
# Ray notes a user waits for, kept on the terminal: Serve's "Application 'bahe' is ready at <url>."
_RAY_MILESTONE = re.compile(r"^Application '[^']*' is ready")


def _is_ray_record(name: str) -> bool:
    return name == "ray" or name.startswith("ray.")


class _TerminalFilter(logging.Filter):
    """What reaches the terminal: this package's records at the root level; other libraries'
    from WARNING; Ray's and Python warnings only from ERROR (their full text goes to the logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _verbose:
            return True
        if _is_ray_record(record.name) or record.name == "py.warnings":
            return record.levelno >= logging.ERROR or bool(_RAY_MILESTONE.match(record.getMessage()))
        if record.name.startswith(("bahe", "__main__")):
            return True
        return record.levelno >= logging.WARNING


class _SessionLogHandler(logging.Handler):
    """Everything this process logs, Ray's records included, into `bahe-driver-<pid>.log` in
    Ray's session log folder; records from before Ray starts wait in memory (up to 10,000)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.path: Path | None = None
        self._file: logging.FileHandler | None = None
        self._held: list[logging.LogRecord] = []

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        """Kept as is: ray.init re-formats every handler of the "ray" logger, this one included."""

    def open(self, folder: Path) -> None:
        if self._file is not None and self.path is not None and self.path.parent == folder:
            return
        self.close_file()
        self.path = folder / f"bahe-driver-{os.getpid()}.log"
        self._file = logging.FileHandler(self.path, delay=True)
        self._file.setFormatter(self.formatter)
        held, self._held = self._held, []
        for record in held:
            self._file.emit(record)

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        elif len(self._held) < 10_000:
            self._held.append(record)


_TERMINAL_FILTER = _TerminalFilter()
_SESSION_LOG = _SessionLogHandler()


def setup_logging(verbose: bool = False) -> None:
    """This process's logging: the terminal (see above) and, once Ray runs, the session log file.

    `bahe` calls it first thing; calling again replaces what an earlier call installed.
    """
    global _verbose
    _verbose = verbose
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_bahe", False)]:
        root.removeHandler(handler)
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    terminal.addFilter(_TERMINAL_FILTER)
    for handler in (terminal, _SESSION_LOG):
        handler._bahe = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _SESSION_LOG.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.captureWarnings(True)  # Python warnings to the "py.warnings" logger: the log file


def route_ray_logs() -> None:
    """Ray's driver-side loggers keep their handlers; their terminal ones pass only errors (the
    filter above), and the ones with no file of their own also write to the session log file.

    Ray configures some of these on import (`ray.data`, `ray.serve`): call again after such an
    import. Cheap; safe to call any time; nothing to do with `bahe -v`.
    """
    if _verbose:
        return
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not (_is_ray_record(name) and isinstance(logger, logging.Logger)):
            continue
        has_file = False
        for handler in logger.handlers:
            if "File" in type(handler).__name__ or handler is _SESSION_LOG:
                has_file = True
            elif isinstance(handler, logging.StreamHandler) and _TERMINAL_FILTER not in handler.filters:
                handler.addFilter(_TERMINAL_FILTER)
        if logger.handlers and not logger.propagate and not has_file:
            logger.addHandler(_SESSION_LOG)


def _filter_forwarded_lines() -> None:
    """Of the worker output Ray forwards to this driver (`log_to_driver`), pass to the terminal
    the lines of the Ray Train workers (the train loop's epochs) and error reports from anyone;
    the rest (Ray Data's per-worker bars, the Train controller, the placement group cleaner,
    raylet and autoscaler notes) is in the session folder's worker-*.out/.err files already.

    Ray has no public switch between all and nothing (`log_to_driver`): this wraps its printer
    on the driver's stream dispatcher (a private hook); if that hook moved, Ray's default stays.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
    except ImportError:
        return
    printers = [handle for name, handle in getattr(dispatcher, "handlers", []) if name == "ray_print_logs"]
    if len(printers) != 1 or getattr(printers[0], "_bahe", False):
        return
    printer = printers[0]

    def terminal_lines(data: dict[str, Any]) -> list[str]:
        lines = data.get("lines") or []
        actor = str(data.get("actor_name") or "")
        if actor.startswith(_OUR_ACTORS):  # but not Ray Train's notes, Ray Data's bars in it, blank lines
            return [line for line in lines
                    if line.strip() and RAY_TQDM_MAGIC not in line and not _RAY_TRAIN_WORKER_NOTE.match(line)]
        if actor.startswith(_RAY_HELPERS):
            return []
        system_process = not str(data.get("pid", "")).isdigit()  # raylet, gcs_server, autoscaler
        for i, line in enumerate(lines):
            if RAY_TQDM_MAGIC not in line and _starts_error_report(line, system_process):
                return [line for line in lines[i:] if line.strip() and RAY_TQDM_MAGIC not in line]
        return []

    def filtered(data: dict[str, Any]) -> None:
        lines = terminal_lines(data)
        if lines:
            printer({**data, "lines": lines})

    filtered._bahe = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)

    # The other way in: notes raylet and GCS push to the driver (worker died, out of memory, ...),
    # printed through worker.print_to_stdstream as "(raylet) ...". Their warnings ("WARNING: 8
    # PYTHON worker processes have been started ...") and retry notices ("Task ... failed. There
    # are infinite retries remaining, so the task will be retried.") stay in the logs; the rest passes.
    from ray._private import worker as ray_worker

    pushed = getattr(ray_worker, "print_to_stdstream", None)
    if pushed is None or getattr(pushed, "_bahe", False):
        return

    def pushed_filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = [line for line in data.get("lines") or []
                 if not _RETRY_NOTE.search(line) and (not _PUSHED_WARNING.match(line) or _SYSTEM_ALERT.search(line))]
        if lines:
            pushed({**data, "lines": lines}, *args, **kwargs)

    pushed_filtered._bahe = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = pushed_filtered


def _ray_data_logging_env() -> None:
    """Ray Data's console handler at ERROR in every process a local instance starts (its file
    handler, ray-data.log in the session folder, keeps everything): Ray Data's documented
    RAY_DATA_LOGGING_CONFIG, a copy of its default configuration with that one level changed.

    Without it each Ray Data run inside a worker (e.g. the validation split a Ray Train worker
    reads) prints "Starting execution ...", "Execution plan ...", "Dataset ... finished" lines.
    """
    import json
    import tempfile

    if "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return
    try:
        from ray.data._internal.logging import DEFAULT_CONFIG
    except ImportError:
        return
    config = json.loads(json.dumps(DEFAULT_CONFIG))
    if "console" not in config.get("handlers", {}):
        return
    config["handlers"]["console"]["level"] = "ERROR"
    path = Path(tempfile.gettempdir()) / f"bahe-ray-data-logging-{os.getuid()}.yaml"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=1))  # JSON is YAML
    tmp.replace(path)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)


def _quiet_ray_data() -> None:
    """Ray Data: one progress bar per dataset execution (not one per operator) on a terminal.

    Off a terminal Ray Data logs its progress instead of drawing it (every 10 s, a block of lines
    per operator); those records go to ray-data.log in the session folder, not to the terminal.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bar_name_truncation = True


def ray_logs_dir() -> Path | None:
    """This node's Ray session log folder (`<temp dir>/<session name>/logs`), once Ray runs."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        return Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    except Exception:  # e.g. a Ray Client connection: the folder is on the cluster
        return None


def ray_logs_note() -> str | None:
    """The closing line naming where Ray's logs went, if this process started or joined Ray."""
    if not _ray_joined:
        return None
    hint = "" if _verbose else "; `bahe -v ...` shows them here"
    if _SESSION_LOG.path is None:
        return f"Ray's logs: in the session folder of the cluster's head node{hint}"
    return f"Ray's logs: {_SESSION_LOG.path.parent} (this process: {_SESSION_LOG.path.name}{hint})"


def before_ray_init() -> None:
    """Unless `bahe -v`: settings that reach the processes a local instance starts through the
    environment (Serve's controller, proxy and replicas log to files only; Ray Data prints only
    errors on the console), and Ray's driver notes of `ray.init` itself to the log file."""
    if not _verbose:
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        _ray_data_logging_env()
    route_ray_logs()


def after_ray_init() -> None:
    """This process's log file in the session folder; Ray Data's bars and the forwarded worker
    output filtered (unless `bahe -v`)."""
    global _ray_joined
    _ray_joined = True
    folder = ray_logs_dir()
    if folder is not None and folder.is_dir():  # a remote cluster's folder is not on this machine
        _SESSION_LOG.open(folder)
    if not _verbose:
        _quiet_ray_data()
        _filter_forwarded_lines()
        route_ray_logs()
