#!/usr/bin/env python
"""A PACS round trip: pull series, segment them with the bundle, store the DICOM SEG / RTSTRUCT in their studies.

    # DICOMweb (QIDO-RS / WADO-RS / STOW-RS); credentials from $FEDHARMONY_PACS_USER / $FEDHARMONY_PACS_PASSWORD
    # or --credentials-file (never on the command line); HTTPS checked against --ca-bundle if given
    python tools/pacs.py --dicomweb https://pacs.example.org/dicom-web --ca-bundle site-ca.pem \
        --study 1.2.840.... --output-format dicom_seg rtstruct --work workspace/pacs -- --ckpt_path models/model.pt

    # DIMSE (C-FIND / C-GET / C-STORE): the peer must know our AE title (--calling-ae) for C-GET
    python tools/pacs.py --dimse pacs.example.org:104 --called-ae ARCHIVE --calling-ae FEDHARMONY \
        --date 20250101-20250131 --modality MR --work workspace/pacs

Arguments after ``--`` go to the bundle (``--ckpt_path``, ``--series_filter`` ...). Each series is logged as done or
skipped and why; ``<work>/pacs_summary.json`` says which results were stored and which were not. Results stay on
disk when the archive refuses them or goes away; rerun the same command (same ``--work``) to store only what is
missing: a series whose SEG / RTSTRUCT is already in its study is not pulled, run or stored again. Exit status:
0 every series done (or its results already in the archive), 1 some series failed, 2 the endpoint is
unreachable. docs/pacs.md
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from fedharmony.data.pacs import (MAX_SERIES, DicomWeb, Dimse, PacsError, load_credentials,  # noqa: E402
                                  round_trip, select_series)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    bundle_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, bundle_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dicomweb", metavar="URL", help="DICOMweb base URL (e.g. http://127.0.0.1:8042/dicom-web)")
    where.add_argument("--dimse", metavar="HOST:PORT", help="DIMSE peer")
    p.add_argument("--called-ae", default="ANY-SCP", help="the peer's AE title (DIMSE)")
    p.add_argument("--calling-ae", default="FEDHARMONY", help="our AE title (DIMSE)")
    p.add_argument("--credentials-file", help="'user:password' or JSON {username, password} (DICOMweb); default "
                                              "$FEDHARMONY_PACS_CREDENTIALS, then $FEDHARMONY_PACS_USER/_PASSWORD")
    p.add_argument("--ca-bundle", help="CA bundle (PEM) to check the HTTPS server against")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network call")
    p.add_argument("--study", nargs="*", default=[], help="Study Instance UIDs (every series, of --modality if given)")
    p.add_argument("--series", nargs="*", default=[], help="Series Instance UIDs")
    p.add_argument("--date", help="study date or range (YYYYMMDD, YYYYMMDD-YYYYMMDD) to query")
    p.add_argument("--modality", help="modality to query (e.g. MR)")
    p.add_argument("--max-series", type=int, default=MAX_SERIES)
    p.add_argument("--output-format", nargs="+", default=["dicom_seg"], choices=["dicom_seg", "rtstruct"])
    p.add_argument("--bundle", default=str(REPO / "bundles" / "prostate_mri_seg"))
    p.add_argument("--work", default="workspace/pacs", help="pulled series, results and pacs_summary.json")
    args = p.parse_args(argv)
    if not (args.study or args.series or args.date or args.modality):
        p.error("say what to pull: --study, --series, or a query (--date and/or --modality)")
    if args.dicomweb:
        endpoint = DicomWeb(args.dicomweb, load_credentials(args.credentials_file), args.ca_bundle, args.timeout)
    else:
        host, _, port = args.dimse.rpartition(":")
        endpoint = Dimse(host, int(port), args.called_ae, args.calling_ae, args.timeout)
    try:
        refs = select_series(endpoint, args.study, args.series, args.date, args.modality, args.max_series)
    except PacsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not refs:
        print(f"nothing to do: {endpoint.name} finds no series for this selection")
        return 1
    summary = round_trip(endpoint, refs, Path(args.work), Path(args.bundle), args.output_format, bundle_args,
                         max_series=args.max_series)
    print(f"{summary['done']} done, {summary['skipped']} skipped ({summary['failed']} failed); "
          f"stored {len(summary['results_stored'])}, not stored "
          f"{len(summary['results_not_stored'])} (summary: {Path(args.work) / 'pacs_summary.json'})")
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr)
        return 2
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
