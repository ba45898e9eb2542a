"""Site datalists: preparing the real datasets' layouts and reading them back with checks (no NVFlare import)."""
