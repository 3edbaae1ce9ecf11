"""``python -m imtl_func.demo``: see :mod:`imtl_func.demo` and ``--help``."""

from imtl_func.demo._cli import main

if __name__ == "__main__":
    main()
