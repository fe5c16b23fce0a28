"""Floor 5, the applications: one module per `cascade-vsr` sub-command (`HELP`, `add_arguments`, `run`), with
heavy imports inside `run` so that `cascade-vsr --help` stays fast."""
