"""Command-line subcommands that sit above every job (``cleardit generate`` may hand over to the
patch-parallel job, so it cannot live inside ``pipelines``)."""
