"""``pushctl``: the command line above the services (SPEC §10).

It may import everything (``cluster``, ``node``, ``router``); nothing imports it.
"""
