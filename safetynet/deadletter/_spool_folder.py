"""Where the spool lives: a folder private to the user the workers run as, never one another user can write.

The spool holds dead letters that staff may replay, so a folder another user can write is refused
(anyone could plant a record: any task, any arguments). ``SPOOL_DIR`` when set; else, in order,
the first of these that exists or can be created:

1. ``$STATE_DIRECTORY/safetynet-spool`` (systemd's ``StateDirectory=``: a service's own state folder);
2. ``$XDG_STATE_HOME/safetynet/spool``;
3. ``~/.local/state/safetynet/spool`` (the XDG default for state that outlives a restart);
4. ``$XDG_RUNTIME_DIR/safetynet/spool`` (private, but lost at logout or reboot);
5. ``<tmp>/safetynet-spool-<uid>``: the last resort of a user with no writable home (a service user,
   a container run as a bare uid). Private too (created 0700 and checked like any other), but lost
   at reboot, and another user could take the name first (then it is refused): system check W006
   says to set ``SPOOL_DIR``.

Folders safetynet creates get mode 0700 (whatever the umask); folders that exist keep their mode.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from safetynet import conf
from safetynet.exceptions import ConfigurationError

__all__ = ["TEMPORARY", "default_location", "ensure", "existing", "inspect", "location", "private_subfolder"]

#: The origin of a folder chosen in the temporary directory (the last resort).
TEMPORARY = "the temporary directory"


def _user() -> str:
    return str(os.geteuid()) if hasattr(os, "geteuid") else os.environ.get("USERNAME", "user")


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _can_make(path: Path) -> bool:
    """Whether ``path`` is a folder, or can be created by this process (its nearest existing folder is writable)."""
    nearest = _nearest_existing(path)
    if nearest == path:
        return os.path.isdir(path)
    return os.path.isdir(nearest) and os.access(nearest, os.W_OK | os.X_OK)


def default_location() -> tuple[Path, str]:
    """The default spool folder when ``SPOOL_DIR`` is not set, and what it was chosen from."""
    candidates: list[tuple[str, Path]] = []
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if os.path.isabs(state):
        candidates.append(("$STATE_DIRECTORY", Path(state) / "safetynet-spool"))
    xdg_state = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg_state):
        candidates.append(("$XDG_STATE_HOME", Path(xdg_state) / "safetynet" / "spool"))
    home = os.path.expanduser("~")
    if os.path.isabs(home):
        candidates.append(("the home directory", Path(home) / ".local" / "state" / "safetynet" / "spool"))
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        candidates.append(("$XDG_RUNTIME_DIR", Path(runtime) / "safetynet" / "spool"))
    for origin, path in candidates:
        if _can_make(path):
            return path, origin
    return Path(tempfile.gettempdir()) / f"safetynet-spool-{_user()}", TEMPORARY


def location() -> tuple[Path, str]:
    """The spool folder (``SPOOL_DIR``, or the default) and where it comes from."""
    configured = conf.get().spool_dir
    if configured:
        return Path(configured), "SAFETYNET['SPOOL_DIR']"
    return default_location()


def _problem(path: Path, *, follow: bool = True) -> tuple[str, bool] | None:
    """Why ``path`` cannot hold dead letters, and whether it is because others could use it (None: it can)."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return "does not exist (a link to nothing?)", False
    except OSError as error:
        return f"cannot be read ({error.strerror})", False
    mode = stat.S_IMODE(info.st_mode)
    described = f"mode {mode:04o}, owner uid {info.st_uid}"
    if not stat.S_ISDIR(info.st_mode):
        return f"is not a folder ({stat.filemode(info.st_mode)}, {described})", False
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return f"belongs to another user ({described}; this process runs as uid {os.geteuid()})", True
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "every user" if mode & stat.S_IWOTH else "its group"
        sticky = " (the sticky bit does not keep others from adding files)" if mode & stat.S_ISVTX else ""
        return f"can be written by {who} ({described}){sticky}", True
    return None


def _refusal(path: Path, origin: str, problem: tuple[str, bool]) -> ConfigurationError:
    what, unsafe = problem
    if not unsafe:
        return ConfigurationError(
            f"The dead-letter spool folder {path} (from {origin}) {what}. Set SAFETYNET['SPOOL_DIR'] to a folder "
            "the workers' user can create and only it can write."
        )
    return ConfigurationError(
        f"The dead-letter spool folder {path} (from {origin}) {what}: another user could plant dead letters "
        f"there, which staff may then replay, or read the ones kept there. Make it private to the user the "
        f"workers run as (chown that user {path}; chmod 700 {path}), or set SAFETYNET['SPOOL_DIR'] to a folder "
        "only that user can write."
    )


def inspect() -> tuple[Path, str, str | None]:
    """The spool folder, its origin and what is wrong with it, in a sentence (None: usable); creates nothing."""
    path, origin = location()
    if not os.path.lexists(path):
        if _can_make(path):
            return path, origin, None
        nearest = _nearest_existing(path)
        return path, origin, (f"The dead-letter spool folder {path} (from {origin}) does not exist and cannot be "
                              f"created: {nearest}, the nearest existing folder, is not a folder this user can write. "
                              "Set SAFETYNET['SPOOL_DIR'] to a folder the workers' user can create.")
    problem = _problem(path)
    return path, origin, None if problem is None else str(_refusal(path, origin, problem))


def existing() -> Path | None:
    """The spool folder if it exists (None otherwise); ConfigurationError if another user can write it."""
    path, origin = location()
    if not os.path.lexists(path):
        return None
    problem = _problem(path)
    if problem is not None:
        raise _refusal(path, origin, problem)
    return path


def _make(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (existing ones are left as they are)."""
    missing = []
    current = path
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: judged below like any existing folder
        os.chmod(folder, 0o700)  # whatever the umask took away or left


def ensure() -> Path:
    """The spool folder, created (0700) if missing; ConfigurationError if it cannot be made or is not private."""
    path, origin = location()
    try:
        _make(path)
    except OSError as error:
        raise ConfigurationError(
            f"The dead-letter spool folder {path} (from {origin}) cannot be created: {error.strerror}. "
            "Set SAFETYNET['SPOOL_DIR'] to a folder the user the workers run as can create and only it can write."
        ) from None
    problem = _problem(path)
    if problem is not None:
        raise _refusal(path, origin, problem)
    return path


def private_subfolder(spool: Path, name: str) -> Path:
    """``spool/name``, created 0700 if missing; ConfigurationError if it is a link or not private."""
    path = spool / name
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigurationError(f"The spool's {name} folder {path} cannot be created: {error.strerror}.") from None
    else:
        os.chmod(path, 0o700)
    problem = _problem(path, follow=False)  # inside the spool nothing is followed: a link is refused
    if problem is not None:
        raise _refusal(path, f"the spool folder {spool}", problem)
    return path
