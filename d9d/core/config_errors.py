"""One wording for the TOML configs' errors (compile presets, training): files and keys."""

import tomllib
from pathlib import Path

from pydantic import ValidationError


def read_toml(path: Path, what: str) -> dict:
    """The TOML table of ``path``.

    Args:
        path: The file.
        what: What the file is, for the messages (``"compile config"``, ...).

    Raises:
        ValueError: If the file does not exist or is not valid TOML (naming the file).
    """
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err


def validation_problems(err: ValidationError) -> str:
    """``"unknown key 'a.b'; key 'c': <message>"`` for every error of ``err``."""
    problems = []
    for error in err.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        else:
            problems.append(f"key '{key}': {error['msg']}")
    return "; ".join(problems)
