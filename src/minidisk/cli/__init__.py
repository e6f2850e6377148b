"""Command-line interface: one module per command group, each thin (parse, call, print)."""
