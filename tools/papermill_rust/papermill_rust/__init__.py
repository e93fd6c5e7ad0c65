"""papermill parameters for Rust notebooks: see `papermill_rust.translator`.

Importing this package (papermill does, through its `papermill.engine` entry point) registers the
translator for the kernel "pivot" and the language "rust".
"""
from .translator import (  # noqa: F401
    Decl,
    RustTranslationError,
    RustTranslator,
    codify_for_notebook,
    let_statement,
    parse_parameters,
    register,
    rust_literal,
    rust_string,
)
