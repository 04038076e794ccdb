"""siterecovery: site recovery for VMware VMs and physical servers.

The code lives in the repository's top-level folders (common/, controller/,
agents/) and is installed under this namespace; see pyproject.toml.
"""

__version__ = "0.1.0"
