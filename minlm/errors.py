"""The error every config check raises, in a module of its own so that ``minlm.config`` and
``minlm.modules`` (whose registrations validate their own options) can both import it
without importing each other."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""
