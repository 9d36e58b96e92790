"""`csafety`: a thin Typer front end. Parses, calls the library, prints with rich.

Every user error is a CrystallizedSafetyError: printed as one line on stderr, exit code 2. One module per
command group; `app` holds what they share. Importing this package registers every command.
"""

from __future__ import annotations  # noqa: I001 - the import order below is the order of `csafety --help`

from .app import app, err, main, out
from . import steer_cmds, organism_cmds, judge_cmds, judge_eval_cmds, run_cmds, blind_cmds, vector_cmds, reading_cmds  # noqa: F401,E501 - registers the commands

__all__ = ["app", "err", "main", "out"]
