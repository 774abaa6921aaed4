"""The one error a configuration check raises. Every section's `check()` (beside its code: models/config.py,
data/config.py, train/config.py, launch/config.py) raises it with the offending key in the message."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""
