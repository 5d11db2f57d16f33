"""Sweeps declared in Python: each module defines ``SWEEP: experiments.sweep.Sweep``; ``eoslab sweep <module>``."""
