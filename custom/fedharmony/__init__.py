"""fedharmony: federated harmonization methods for multi-site medical imaging on NVFlare + MONAI."""

__version__ = "0.1.0"
