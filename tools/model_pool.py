#!/usr/bin/env python
"""Check an IOP-FL model pool as a site would before routing with it, or re-stamp a pool you made.

    python tools/model_pool.py check POOL_DIR [--bundle BUNDLE_DIR]
    python tools/model_pool.py stamp POOL_DIR [--bundle BUNDLE_DIR]

``check`` runs every check ``routed_inference.json`` runs when it loads the pool
(:func:`fedharmony.methods.iopfl.model_pool.load_pool`: the manifest's overrides and config files
against the bundle's allow-list, expert files inside the folder and equal to their recorded
sha256, finite weights of one architecture that fit the bundle's network) and prints what the
pool holds. Exit status 1 names what failed.

``stamp`` records the digest of each expert file in the manifest, for a pool written before
digests existed (format ``fedharmony-model-pool/1``): it vouches that the files on disk are the
federation's, so run it only on pools you made or got from someone you trust. Everything else
is checked first, and nothing is written when a check fails.

The bundle defaults to the site's installed ``prostate_mri_seg`` (``$FEDHARMONY_BUNDLE_ROOT``,
else the checkout's ``bundles/``).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["check", "stamp"])
    p.add_argument("pool_dir", help="the pool folder (holds manifest.json)")
    p.add_argument("--bundle", help="the bundle the pool's experts are built from (default: the installed "
                                    "prostate_mri_seg)")
    args = p.parse_args(argv)

    from fedharmony.bundle.job_policy import PolicyError, site_bundle_root
    from fedharmony.methods.iopfl.model_pool import PoolError, load_pool, stamp_pool

    try:
        bundle = args.bundle or str(site_bundle_root() / "prostate_mri_seg")
        if args.command == "stamp":
            print(f"stamped {stamp_pool(args.pool_dir, bundle)}")
        pool = load_pool(args.pool_dir, bundle)
    except (PoolError, PolicyError) as e:
        print(f"model_pool.py {args.command}: {e}", file=sys.stderr)
        return 1
    print(f"{args.pool_dir}: {len(pool.names)} experts ({', '.join(pool.names)}), digests match, weights finite, "
          f"built from {', '.join(pool.manifest['config_files'])} with overrides {pool.overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
