"""The CLI's error boundary, in words: what ``main`` says for each kind of failure, in one line
(an OS error naming the user's file, not our temporary one; a damaged zarr store; what was kept
after Ctrl-C; what to make smaller after running out of memory)."""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path


def raised_in(e: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in one of ``packages``."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module.split(".")[0] in packages


def store_of(args: argparse.Namespace) -> str:
    """The zarr store a command reads or resumes (export --labels, predict --out...)."""
    for key in ("labels", "input", "out", "like"):
        value = getattr(args, key, None)
        if isinstance(value, str) and value.rstrip("/").endswith(".zarr"):
            return value
    return getattr(args, "labels", None) or getattr(args, "out", None) or "the store"


# ---------------------------------------------------------------------------------------------
# the error boundary's wording

def one_line(text: object) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def say(text: str) -> None:
    print(one_line(text), file=sys.stderr)


def command_name(args: argparse.Namespace) -> str:
    return " ".join(x for x in (args.command, getattr(args, "action", None)) if x)


def set_threads() -> None:
    from ..core.device import threads_from_env

    threads = threads_from_env(os.environ.get("GENSELFDIFF_THREADS"))
    if threads is not None:
        import torch
        torch.set_num_threads(threads)


def output_of(args: argparse.Namespace) -> str | None:
    """The path a command writes (to name in an OS error that names none, e.g. a full disk)."""
    for key in ("out", "json", "geojson", "tiff", "ome_zarr", "overlay", "folder"):
        value = getattr(args, key, None)
        if isinstance(value, str) and value:
            return value
    return None


#: Our temporary files and folders: ``.<target name>.<random>.tmp`` next to the target
#: (core.atomic, core.checkpoint); an error about one is an error about its target.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[^.]+\.tmp$")


def user_path(filename: object) -> str:
    path = Path(os.fsdecode(filename)) if isinstance(filename, (str, bytes, os.PathLike)) else Path(str(filename))
    m = _TEMP_NAME.match(path.name)
    return str(path.with_name(m.group("target"))) if m else str(path)


def describe_os_error(e: OSError, output: str | None = None) -> str:
    """One line for an OS error: the path it concerns (the target of a failed rename, the file
    a temporary file stood in for, else ``output``) and what went wrong, in words."""
    filename = e.filename2 if e.filename2 is not None else e.filename
    path = user_path(filename) if filename is not None else None
    if isinstance(e, IsADirectoryError):
        what = "is a folder; give a file name (or a new path)"
    elif e.errno == errno.ENOSPC:
        what = "no space left on the disk; free some space and run again"
    elif e.errno == errno.EROFS:
        what = "read-only file system; choose an output on a writable disk"
    elif isinstance(e, PermissionError):
        what = "permission denied; choose a folder you can write to (or check the file's permissions)"
    elif isinstance(e, NotADirectoryError):
        what = "a file stands where a folder is needed"
    elif isinstance(e, FileNotFoundError):
        what = "no such file or folder"
    else:
        what = (e.strerror or str(e) or type(e).__name__).rstrip(".").lower()
    if path is not None:
        return f"{path}: {what}"
    return f"{what} (writing {output})" if output else what


def after_cancel(args: argparse.Namespace) -> str:
    """What a Ctrl-C kept, and how to continue, for each command."""
    command = command_name(args)
    if command in ("pretrain", "finetune"):
        if Path(args.out).exists():
            return f"the checkpoint reached so far is kept in {args.out}; add --resume to the same command to continue"
        return f"nothing was saved in {args.out} yet"
    if command == "predict":
        return f"finished blocks are kept in {args.out}; run the same command again to resume from them"
    if command == "project refine":
        return (f"the model reached so far is kept under {Path(args.folder) / 'models'} and the refine is "
                "recorded as cancelled; the current model is unchanged (run refine again to start over, or "
                "pass the partial model as --base-model to start from it)")
    if command in ("evaluate", "sample"):
        return "nothing was written"
    if command == "export":
        return ("an export already reported is complete; the one being written was discarded and an earlier "
                "file of its name is unchanged")
    return ""  # project create / status, demo: what is done stays done


def smaller(args: argparse.Namespace) -> str:
    flags = [f for f, key in (("--batch", "batch"), ("--tile", "tile"), ("--patch", "patch"), ("--n", "n"))
             if getattr(args, key, None) is not None]
    return f"try a smaller {' / '.join(flags)}" if flags else "try a smaller input"
