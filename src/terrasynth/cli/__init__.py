"""The ``terrasynth`` command line."""
