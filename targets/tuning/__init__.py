"""Kernel tuning: MetaSchedule search, the tuning database, and the int8 tile database."""
