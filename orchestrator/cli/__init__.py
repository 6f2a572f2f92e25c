"""The `tune` command: parses arguments and prints; all work happens in the core. main.py maps every exception
to an exit status (the only place), one module per command group."""
