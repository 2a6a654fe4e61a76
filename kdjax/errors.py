"""Errors a user can cause, as opposed to bugs.

Every error that a person running kdjax can cause and fix (a bad config value,
a missing or malformed dataset, a workdir that is not a kdjax workdir, ...)
is a :class:`UserError`. Its message says what is wrong and what to do, in
one line where possible. The command line (``kdjax.main``) prints it as
``kdjax: <message>`` on stderr, without a traceback, and exits with status 2;
any other exception is a bug and keeps its traceback (exit status 1).

The subclasses also inherit the built-in exception that code raised before
these classes existed, so ``except ValueError`` / ``pytest.raises(ValueError)``
keep catching them:

* :class:`ConfigError` (ValueError): a config value or key, a command-line flag.
* :class:`ConfigFileNotFoundError` (ConfigError, FileNotFoundError): no such config file.
* :class:`DataError` (ValueError): a dataset root, category, image or mask.
* :class:`WorkdirError` (OSError): a workdir that is missing, not a kdjax
  workdir, or holds no trained model.

Raise them with a message that names the setting, the bad value and the fix::

    raise ConfigError("train.optimizer='lion' is not supported: use 'adam'.")
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user caused and can fix; the message says how (no traceback)."""


class ConfigError(UserError, ValueError):
    """A config key or value (config file, --config.<key> flag) or another flag is wrong."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The config file named by --config (or load_config) does not exist."""


class DataError(UserError, ValueError):
    """The dataset (root, categories, images, masks) is missing or malformed."""


class WorkdirError(UserError, OSError):
    """The workdir is missing, is not a kdjax workdir, or holds no trained model."""


__all__ = ["ConfigError", "ConfigFileNotFoundError", "DataError", "UserError", "WorkdirError"]
