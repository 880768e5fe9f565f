"""Running it: metrics, logs (text and JSON, the per-connection trace),
stats events, signals and the bounded stop, startup checks and errors,
and the process's file-descriptor and memory budgets."""
