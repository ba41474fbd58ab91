"""Where an export may be written, and landing it there without ever deleting what is not ours.

Every export directory carries ``transact_export.json``, a manifest naming the files the export wrote.
``overwrite`` replaces a directory only when it is recognisably an earlier export: every entry in it is a
file that its manifest lists (or, for exports written before manifests existed, a file name that an
export writes, next to ``transact_plans.json``). Anything else (notes, a ``.git``, a run's checkpoints) is
refused at startup with one line. The finished export is renamed into place; without ``overwrite`` the
name is first claimed with an atomic ``mkdir``, so two runs exporting to one directory cannot both succeed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transact_pl.errors import ConfigError

MANIFEST_FILE = "transact_export.json"
LEGACY_MARKER = "transact_plans.json"
# Files an export writes (safetensors weights, config, tokenizer, model card, plans, evaluation).
EXPORT_FILE_PATTERNS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
    "README.md", "transact_plans.json", "transact_eval.json", MANIFEST_FILE,
)


def _manifest_files(directory: Path) -> set[str] | None:
    try:
        files = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(name, str) and "/" not in name for name in files):
        return None  # not a manifest this project writes
    return set(files) | {MANIFEST_FILE}


def foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that are not part of an earlier export of ours (empty: safe to replace)."""
    entries = sorted(directory.iterdir())
    if not entries:
        return []
    listed = _manifest_files(directory)
    if listed is None and not (directory / LEGACY_MARKER).is_file():
        return [entry.name for entry in entries]

    def ours(entry: Path) -> bool:
        if entry.is_symlink() or not entry.is_file():
            return False
        if listed is not None:
            return entry.name in listed
        return any(fnmatch.fnmatch(entry.name, pattern) for pattern in EXPORT_FILE_PATTERNS)

    return [entry.name for entry in entries if not ours(entry)]


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def writability_problem(path: Path, option: str) -> str | None:
    """Why the export's parent directory cannot be created or written, found by creating and removing a probe."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        return f"`{option}={path}` cannot be created: {ancestor} is a file, not a directory; choose another directory"
    try:
        probe, probe_path = tempfile.mkstemp(prefix=".transact-probe-", dir=ancestor)
        os.close(probe)
        os.unlink(probe_path)
    except OSError as error:
        return (f"`{option}={path}` cannot be written ({ancestor}: {error.strerror or error}); "
                "choose a writable directory")
    return None


def export_dir_problem(output_dir: str | Path, overwrite: bool, option: str = "--export.output_dir") -> str | None:
    """Why an export cannot go to ``output_dir``, or None: checked before any work is done."""
    path = Path(output_dir)
    if path.is_symlink():
        return f"`{option}={path}` is a symbolic link; give the real directory"
    if path.exists():
        if not path.is_dir():
            return f"`{option}={path}` exists and is not a directory; choose another directory"
        if not overwrite:
            return f"`{option}={path}` already exists; choose another directory or pass `overwrite: true` (it replaces an earlier export only)"
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            return (f"`{option}={path}` holds files that no export of this project wrote ({shown}); overwrite replaces "
                    "only an earlier export, never other files: choose another directory")
    return writability_problem(path, option)


def check_export_dir(output_dir: str | Path, overwrite: bool, option: str = "--export.output_dir") -> None:
    """Raise one ``ConfigError`` when the export cannot go to ``output_dir`` (see :func:`export_dir_problem`)."""
    problem = export_dir_problem(output_dir, overwrite, option)
    if problem:
        raise ConfigError(problem)


def run_dir_problem(output_dir: str | Path, run_roots: Iterable[str | Path], written_dirs: Iterable[str | Path],
                    option: str = "--export.output_dir") -> str | None:
    """An export directory that is or contains a directory of the run, or lies inside one the run writes into.

    ``run_roots`` (e.g. ``default_root_dir``) may hold an export below them; ``written_dirs`` (log and
    checkpoint directories, whose files the run rotates and replaces) may not. The current working directory
    is never a root here: exports usually live below it.
    """
    output = Path(output_dir).resolve()
    cwd = Path.cwd().resolve()
    written = [Path(d) for d in written_dirs]
    for run_dir in [*[Path(d) for d in run_roots], *written]:
        directory = run_dir.resolve()
        if output == directory or output in directory.parents:
            return (f"`{option}={output_dir}` is or contains the run's own directory {run_dir} (checkpoints, logs); "
                    "export elsewhere, e.g. exports/<name>")
    for run_dir in written:
        directory = run_dir.resolve()
        if directory != cwd and directory in output.parents:
            return (f"`{option}={output_dir}` lies inside {run_dir}, where the run writes its logs or checkpoints; "
                    "export elsewhere, e.g. exports/<name>")
    return None


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_staging_dir(output: Path) -> Path:
    """A hidden sibling of ``output`` to write into, with the permissions the user's umask gives a new directory."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes 0700, which would hide the export from the user's group
    return staging


def share_files(directory: Path, mode: int | None = None) -> None:
    """Give every file of ``directory`` ``mode`` (None: the permissions the user's umask gives a new file).

    Not every writer follows the umask: safetensors' ``save_file`` (transformers' writer) makes ``model.safetensors``
    0600, which would leave the weights unreadable to the user's group beside a readable config.
    """
    mode = 0o666 & ~_current_umask() if mode is None else mode
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(mode)


def write_manifest(directory: Path) -> None:
    """Name every file of the finished export, so a later ``overwrite`` knows exactly what it may replace."""
    files = sorted(entry.name for entry in directory.iterdir() if entry.is_file())
    (directory / MANIFEST_FILE).write_text(json.dumps({"written_by": "transact-pl", "files": files}, indent=1))


def move_into_place(staging: Path, output: Path, overwrite: bool, option: str = "--export.output_dir") -> None:
    """Rename the finished ``staging`` to ``output``; replace an existing ``output`` only if overwriting an export.

    Without ``overwrite`` the name is claimed with ``mkdir`` (atomic: of two concurrent exports one wins and
    the other is told); the claimed empty directory is then replaced by the rename.
    """
    if not overwrite or not output.exists():
        try:
            output.mkdir()
        except FileExistsError:
            raise ConfigError(f"`{option}={output}` appeared while this export was being written (another run?); "
                              "nothing was replaced: choose another directory or pass `overwrite: true`") from None
        os.rename(staging, output)
        return
    problem = export_dir_problem(output, overwrite=True, option=option)  # it may have changed since startup
    if problem:
        raise ConfigError(problem)
    retired = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.rename(output, retired)
    try:
        os.rename(staging, output)
    except OSError:
        os.rename(retired, output)
        raise
    shutil.rmtree(retired)
