"""The lab: the experiments that measure the paper's claims (python -m lab.<name>)."""
