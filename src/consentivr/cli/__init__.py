"""The ``consentivr`` command line: ``consentivr.cli.main:main`` is the entry point."""
