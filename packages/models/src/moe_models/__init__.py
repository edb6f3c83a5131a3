"""moe_models."""
