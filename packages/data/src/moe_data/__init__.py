"""moe_data."""
