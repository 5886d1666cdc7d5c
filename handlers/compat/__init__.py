"""Holds the ``ts`` shim. This directory goes on a worker's sys.path (handlers.COMPAT_PATH); the
file only makes setuptools ship the directory in non-editable installs."""
