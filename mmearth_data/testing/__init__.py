"""Stand-ins for services this machine cannot reach, kept apart from the sources they stand in for:
``ee_offline`` initialises earthengine-api without a network (real expressions, nothing sent) and
``ee_fake`` answers Earth Engine requests in the service's formats and checks them as it would. Used by
the tests, ``bench/ee_sim.py`` and ``mmearth ee-check --simulate``."""
