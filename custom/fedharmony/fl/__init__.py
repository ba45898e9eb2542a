"""NVFlare glue: thin components over the pure modules of ``fedharmony``."""
