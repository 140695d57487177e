"""The shared library of xai-workbench: settings, database, app factory, identity, events,
service calls and object storage, the same for every service in both run modes."""

__version__ = "0.1.0"
