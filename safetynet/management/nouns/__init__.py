"""The nouns of ``manage.py safetynet``: one module each, behind the command in ``commands/safetynet.py``."""
