"""One module per command line: pcam-search, pcam-refit and pcam-predict."""
