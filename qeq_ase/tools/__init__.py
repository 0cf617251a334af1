"""Repository tooling: ``qeq-report`` (regenerates ``docs/results.md``) and the published rMD17
figures it compares against.
"""
