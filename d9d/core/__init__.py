"""Low-level pieces every layer may use: the distributed context, constants, input checks."""
