"""NVFlare glue: thin components over the pure modules of ``fedharmony``.

``SITE_COMPONENTS`` / ``SERVER_COMPONENTS``: every class a fedharmony job names, by the
dotted path NVFlare builds it from. A participant that forbids custom code allow-lists
exactly these (``tools/site_policy.py``), not the whole package: a package prefix would
also admit anything importable under it (a helper that parses a job's config, say).
"""

SITE_COMPONENTS = ("fedharmony.fl.executor.BundleExecutor",)
SERVER_COMPONENTS = (
    "fedharmony.fl.persistor.BundleModelPersistor",
    "fedharmony.fl.aggregator.SiteUpdateAggregator",
    "fedharmony.methods.prrfl.server.FourierAggregator",
    "fedharmony.methods.scaffold.server.ScaffoldAggregator",
    "fedharmony.fl.pool.ModelPoolWriter",
    "fedharmony.fl.site_errors.SiteErrorLogger",
    "fedharmony.fl.summary.RoundSummaryWriter",
)
