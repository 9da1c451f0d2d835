"""The kit's own errors: each message names the parameter, the value, what was expected and the fix."""


class LoraKitError(Exception):
    """Base of every error the kit raises on purpose."""


class ConfigError(LoraKitError, ValueError):
    """Run parameters that cannot run."""


class TargetingError(LoraKitError, ValueError):
    """A LoRA target plan that would not instrument what was asked."""


class DataError(LoraKitError, ValueError):
    """A data file or sample that cannot be used; names the file and line."""


class AdapterError(LoraKitError, ValueError):
    """A peft adapter that would not load what it holds into this model; names the folder and the keys."""
