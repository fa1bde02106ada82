"""lmforge's test suite (a package, so shared helpers import as ``tests.helpers.*`` with no sys.path edits).

Layers: tiny CPU unit tests; multi-process gloo tests (marked ``multiprocess``: spawned ranks on 127.0.0.1
with a hard timeout); end-to-end CLI tests on small real data (``../shared/data`` or ``$LMFORGE_DATA``,
skipped with a reason when absent); live-server tests with bounded client loops; ``cuda`` tests skip
without a GPU."""
