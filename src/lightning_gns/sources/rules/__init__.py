"""Per-example gradient norm rules, one file per layer family, and the registry that maps layers to them."""

from lightning_gns.sources.rules.registry import CallRule, NormRule, get_call_rule, get_norm_rule, register_norm_rule

__all__ = ["CallRule", "NormRule", "get_call_rule", "get_norm_rule", "register_norm_rule"]
