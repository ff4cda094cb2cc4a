"""Human curation in Label Studio: Emu's generalist round (200K -> 20K, recall) and specialist round
(20K -> 2K + captions, precision), then the curated set. See annotation/curation.py for the functions
a flow calls and ``python -m annotation --help`` for the CLI."""
