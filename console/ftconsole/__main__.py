"""``python -m ftconsole serve | labels export | labels import`` (see ftconsole.cli)."""

from ftconsole.cli import main

if __name__ == "__main__":
    main()
