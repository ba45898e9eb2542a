"""NVFlare glue: thin components over the pure modules of ``fedharmony``.

``SITE_COMPONENTS`` / ``SERVER_COMPONENTS``: every class a fedharmony job names, by the
dotted path NVFlare builds it from. A participant that forbids custom code allow-lists
exactly these (``tools/site_policy.py``), not the whole package: a package prefix would
also admit anything importable under it (a helper that parses a job's config, say). The
method-specific ones come from each method's ``SPEC`` (``server_components``).
"""

from fedharmony.methods import SPECS

SITE_COMPONENTS = ("fedharmony.fl.executor.BundleExecutor",)
COMMON_SERVER_COMPONENTS = (
    "fedharmony.fl.persistor.BundleModelPersistor",
    "fedharmony.fl.aggregator.SiteUpdateAggregator",
    "fedharmony.fl.site_errors.SiteErrorLogger",
    "fedharmony.fl.summary.RoundSummaryWriter",
)
# plus what each method's SPEC names (its aggregator, the IOP-FL pool writer)
SERVER_COMPONENTS = COMMON_SERVER_COMPONENTS + tuple(c for s in SPECS.values() for c in s.server_components)
