"""lmms-eval task definitions (YAML + utils.py), passed to lmms-eval with
`--include_path eval/lmms_tasks` / TaskManager(include_path=...)."""
