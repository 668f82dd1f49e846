"""The weight-conversion command line: python -m convert --help."""
