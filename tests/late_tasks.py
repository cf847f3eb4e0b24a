"""A task the first test worker does not know (deployed later): its messages die as unknown_task."""

import safetynet


@safetynet.task
def late(n):
    return n
