"""The `conveyor` command line: one thin module per command group."""
