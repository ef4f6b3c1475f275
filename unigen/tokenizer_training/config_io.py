"""Moved to :mod:`unigen.config_io` (one builder for every config); kept so that old imports work."""

from unigen.config_io import build_config, config_to_dict, load_config, parse_overrides

__all__ = ["build_config", "config_to_dict", "load_config", "parse_overrides"]
