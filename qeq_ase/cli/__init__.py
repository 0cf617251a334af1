"""Command-line plumbing: shared argument types and one-line errors, ``qeq-check`` and ``qeq-info``.
The other commands' ``main`` functions live beside what they run (``pyproject.toml``, ``[project.scripts]``).
"""
