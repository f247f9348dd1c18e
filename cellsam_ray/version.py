"""The package's version: in the report, and in the resume fingerprint (a new version never resumes an old
run's work). pyproject.toml reads it from here."""

__version__ = "0.1.0"
