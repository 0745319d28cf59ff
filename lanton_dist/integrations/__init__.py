"""Integrations of lanton_dist with other training frameworks (Megatron-core, ...)."""
