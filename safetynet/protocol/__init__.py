"""The wire protocol: what travels in messages and events, typed, with no Django or Celery in it.

- ``headers``: the names of the message headers safetynet reads and writes;
- ``reasons``: why a task was given up (``Reason``, a ``StrEnum``), used by models, dead letters,
  signals and metrics alike;
- ``history``: the attempt history that travels in a retried message (``HistoryEntry``, ``History``);
- ``events``: the one terminal event every way a task ends produces (``TaskEnded``);
- ``attempt``: the state of one run (``Attempt``) and the plug-in interface (``Plugin``) the
  runtime drives.

Everything above this package reads these names; nothing here imports anything of safetynet but
the pure core and the exceptions.
"""
