"""``python -m longkv`` is the ``longkv`` command."""

from longkv.cli import main

main()
