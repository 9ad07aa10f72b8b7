"""One wording for pydantic validation errors of the TOML configs (presets, training)."""

from pydantic import ValidationError


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
