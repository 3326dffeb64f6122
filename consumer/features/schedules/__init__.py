"""Schedules: what an app declares (``spec``) and the leader that fires them (``leader``)."""
