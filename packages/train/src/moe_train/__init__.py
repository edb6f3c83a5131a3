"""moe_train."""
