"""What ``pip install django-safetynet[...]`` brings: enough to run what each extra is for."""

import importlib.metadata

from packaging.requirements import Requirement


def extra_requirements(extra):
    found = []
    for line in importlib.metadata.requires("django-safetynet") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
            found.append(requirement)
    return found


def test_the_redis_extra_brings_what_kombus_redis_transport_imports():
    """redis-py alone cannot start a Redis-broker worker: kombu's transport also imports packaging. celery[redis]
    brings kombu[redis], which lists both (and a redis-py version kombu supports)."""
    [celery] = [requirement for requirement in extra_requirements("redis") if requirement.name == "celery"]
    assert "redis" in celery.extras
    # kombu 5.7 lists packaging under its redis extra; kombu 5.5 requires it always.
    kombu_redis = [Requirement(line) for line in importlib.metadata.requires("kombu") or []
                   if Requirement(line).marker is None or Requirement(line).marker.evaluate({"extra": "redis"})]
    assert {requirement.name for requirement in kombu_redis} >= {"redis", "packaging"}
