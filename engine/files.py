"""Files that must never be half-written, and the code's revision: no torch here, so tools/ can use them."""

import os
import subprocess
from pathlib import Path

from engine.errors import ConfigError


def git_revision(mark_changes=False):
    """The short git revision of the code; with mark_changes, "+changes" after it when the working tree differs
    from it (a measurement of code not yet committed says so)."""
    root = Path(__file__).parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        revision = out.stdout.strip() or "unknown"
        if mark_changes:
            changes = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
            )
            revision += "+changes" if changes.stdout.strip() else ""
        return revision
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write(path, write, then="--resume"):
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a kill at any instant leaves either the old file or the new one, never half of one. A failed
    write (a full disk, a lost mount) removes the temporary file, keeps the old file, and ends the
    run with one line (ConfigError)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # (save_checkpoint serialises first, so torch.save's errors never land here)
        tmp.unlink(missing_ok=True)
        raise write_failed(path, error, path.name, then) from None


def write_failed(path, error, kept, then="--resume"):
    """The one line for a failed write: what failed, that `kept` (a file beside it) is intact, what to do
    (`then`: after a run's failed write, --resume)."""
    intact = f"the previous {kept} is intact" if (Path(path).parent / kept).exists() else f"no {kept} was written"
    reason = error.strerror or str(error)
    return ConfigError(f"could not write {path} ({reason}); {intact}; free some space (or fix the disk), then {then}")
