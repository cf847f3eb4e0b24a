"""The Celery side of safetynet: the task base class, its options and the attempt history."""
