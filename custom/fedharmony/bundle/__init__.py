"""Running a MONAI bundle on a site (no NVFlare import): the round runner, 2.5D transforms, inferers, losses."""
