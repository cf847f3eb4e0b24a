"""Finding tasks in the Celery app, for checks and ``explain``."""

from __future__ import annotations

import difflib
import logging
import threading
from typing import Any, cast

from celery import current_app

from safetynet.exceptions import ConfigurationError

__all__ = ["UnknownTask", "find_task", "user_tasks"]

logger = logging.getLogger("safetynet")


class UnknownTask(ConfigurationError, LookupError):
    """No registered task has that name."""


_importing = threading.local()


def _app() -> Any:
    app = cast(Any, current_app)._get_current_object()
    # Celery's Django fixup runs the system checks while it imports the task modules, and
    # our checks come back here: import once, not recursively.
    if not getattr(_importing, "active", False):
        _importing.active = True
        try:
            app.loader.import_default_modules()  # the imports and autodiscovery a worker would do
        except Exception as error:  # a broken task module is reported, not hidden
            logger.warning("safetynet: importing the task modules failed: %r", error)
        finally:
            _importing.active = False
    return app


def user_tasks() -> dict[str, Any]:
    """Every registered task but Celery's own ``celery.*`` ones, by name."""
    return {name: task for name, task in sorted(_app().tasks.items()) if not name.startswith("celery.")}


def find_task(name: str) -> Any:
    """The task called ``name``; ``UnknownTask`` lists the closest names when there is none."""
    tasks = user_tasks()
    if name in tasks:
        return tasks[name]
    close = difflib.get_close_matches(name, tasks, n=5, cutoff=0.5)
    close += [known for known in tasks if known.endswith("." + name.rsplit(".", 1)[-1]) and known not in close]
    hint = f" Close matches: {', '.join(close)}." if close else (
        f" Registered tasks: {', '.join(tasks)}." if tasks else " No tasks are registered: is the Celery app loaded?"
    )
    raise UnknownTask(f"No task named {name!r}.{hint}")
