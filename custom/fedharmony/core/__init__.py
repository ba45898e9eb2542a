"""Shared pieces with no NVFlare import: aggregation math, metrics, result tables, atomic files, norm layers."""
