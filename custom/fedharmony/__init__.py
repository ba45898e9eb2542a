"""fedharmony: federated harmonization methods for multi-site medical imaging on NVFlare + MONAI."""

__version__ = "0.1.0"

import logging as _logging

# MONAI builds an nvImageCodec DICOM reader whenever pydicom is installed and warns, at every image load, that
# nvImageCodec is missing; DICOM here is read by SimpleITK (fedharmony.data.images), so the warning says nothing
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
