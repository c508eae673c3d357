"""The command layer: the CLI and the drivers it runs (compile, evaluate, explain, doctor, export, record, migrate)."""
