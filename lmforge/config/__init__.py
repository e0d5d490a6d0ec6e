"""Config: YAML with line numbers → feature-scoped pydantic sections. Imports no torch."""

from lmforge.config.schema import LmforgeConfig, build_config, check_files, json_schema, load_config

__all__ = ["LmforgeConfig", "build_config", "check_files", "json_schema", "load_config"]
