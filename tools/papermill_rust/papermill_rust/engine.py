"""`papermill --engine rust`: papermill's nbclient engine under another name.

papermill reads no translator entry points, but it imports every `papermill.engine` entry point
when it is itself imported. Loading this one imports the package `papermill_rust`, whose
`translator` module registers the Rust translator. Nothing here may import `papermill_rust.translator`:
when a program imports `papermill_rust` first, this module runs while that one is half-initialised.
"""
from papermill.engines import NBClientEngine


class RustEngine(NBClientEngine):
    """Identical to papermill's default engine ("nbclient")."""
