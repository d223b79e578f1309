"""``python -m refine_cli`` runs the command-line tool."""

from refine_cli.cli import main

if __name__ == "__main__":
    main()
