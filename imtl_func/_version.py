"""The package version, the single source read by the build (pyproject.toml) and the package."""

__version__ = "0.1.0"
